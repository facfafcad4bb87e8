"""Baselines from a store's top-k (top-k KD, ULD, MinED) against references written from their papers.

Each reference is a per-position float64 Python loop over plain lists, written from the definition (DistillKit /
Megatron-LM's top-k forward KL with a tail bucket; Boizard et al.'s sorted-probability L1; FuseLLM's MinED map and
KL), never from the implementation's tensor code. Seeded cases pin values; a student equal to the teacher gives
the minimum.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alm.align.chunks import Chunks
from alm.losses.baselines import (
    MinedVocabMap,
    mined_kl_loss,
    mined_vocab_map,
    one_to_one_chunk_positions,
    topk_kd_loss,
    uld_loss,
)
from tests.tolerance import assert_fp32_close


def _softmax64(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference_topk_kl(logits, topk_id, topk_logp, mask) -> float:
    """Σ_v∈S p_T(v) log(p_T(v)/p_S(v)) + p_tail log(p_tail/q_tail), mean over masked positions."""
    total, count = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            q = _softmax64([float(x) for x in logits[b, t]])
            p: dict[int, float] = {}
            for i, lp in zip(topk_id[b, t].tolist(), topk_logp[b, t].tolist(), strict=True):
                p[i] = p.get(i, 0.0) + math.exp(lp)
            kl = sum(pv * math.log(pv / q[v]) for v, pv in p.items() if pv > 0)
            p_tail = max(0.0, 1.0 - sum(p.values()))
            q_tail = sum(qv for v, qv in enumerate(q) if v not in p)
            if p_tail > 0:
                kl += p_tail * math.log(p_tail / q_tail)
            total += kl
            count += 1
    return total / max(count, 1)


def reference_uld(logits, topk_logp, mask) -> float:
    """Σ_i |sorted p_S − sorted p_T| over the k entries, plus |tail_S − tail_T|, mean over masked positions."""
    total, count = 0.0, 0
    B, T, _ = logits.shape
    k = topk_logp.shape[-1]
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            s = sorted(_softmax64([float(x) for x in logits[b, t]]), reverse=True)[:k]
            p = sorted((math.exp(x) for x in topk_logp[b, t].tolist()), reverse=True)
            d = sum(abs(a - c) for a, c in zip(s, p, strict=True))
            d += abs(max(0.0, 1 - sum(s)) - max(0.0, 1 - sum(p)))
            total += d
            count += 1
    return total / max(count, 1)


def _teacher_topk(rng: np.random.Generator, B: int, T: int, V: int, k: int):
    logits = rng.normal(size=(B, T, V)) * 2.0
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1)[..., :k]
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(
        np.take_along_axis(logp, ids, -1).astype(np.float32)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_kd_matches_the_per_position_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    B, T, V, k = 2, 5, 23, 4
    ids, logp = _teacher_topk(rng, B, T, V, k)
    student = torch.from_numpy(rng.normal(size=(B, T, V)).astype(np.float32))
    mask = torch.from_numpy(rng.random((B, T)) < 0.7)
    mask[0, 0] = True
    got = topk_kd_loss(student, ids, logp, mask)
    want = reference_topk_kl(student.double(), ids, logp.double(), mask)
    assert_fp32_close(got.item(), want)


def test_topk_kd_and_uld_are_pinned_on_a_seeded_case() -> None:
    rng = np.random.default_rng(1234)
    ids, logp = _teacher_topk(rng, 1, 3, 11, 3)
    student = torch.from_numpy(rng.normal(size=(1, 3, 11)).astype(np.float32))
    mask = torch.ones(1, 3, dtype=torch.bool)
    got = topk_kd_loss(student, ids, logp, mask)
    assert_fp32_close(got.item(), reference_topk_kl(student.double(), ids, logp.double(), mask))
    assert_fp32_close(got.item(), 1.3538036346435547)  # pinned
    assert_fp32_close(uld_loss(student, logp, mask).item(), 0.7557976841926575)  # pinned
    assert_fp32_close(
        uld_loss(student, logp, mask).item(), reference_uld(student.double(), logp.double(), mask)
    )


def test_topk_kd_padded_vocab_columns_and_padding_positions_do_not_count() -> None:
    rng = np.random.default_rng(5)
    ids, logp = _teacher_topk(rng, 1, 4, 13, 3)
    student = torch.from_numpy(rng.normal(size=(1, 4, 13)).astype(np.float32))
    padded = torch.cat([student, torch.full((1, 4, 3), 50.0)], dim=-1)
    mask = torch.tensor([[True, True, False, True]])
    a = topk_kd_loss(student, ids, logp, mask)
    b = topk_kd_loss(padded, ids, logp, mask, vocab_size=13)
    assert_fp32_close(a.item(), b.item())
    garbage = student.clone()
    garbage[0, 2] = 1e3 * torch.randn(13)
    assert_fp32_close(topk_kd_loss(garbage, ids, logp, mask).item(), a.item())


def test_topk_kd_and_uld_have_their_minimum_at_the_teacher() -> None:
    rng = np.random.default_rng(7)
    V, k = 17, 5
    teacher_logits = torch.from_numpy(rng.normal(size=(1, 6, V)).astype(np.float32) * 2)
    teacher_logp = torch.log_softmax(teacher_logits, -1)
    logp, ids = torch.topk(teacher_logp, k, dim=-1)
    mask = torch.ones(1, 6, dtype=torch.bool)
    student = teacher_logits.clone().requires_grad_(True)
    kd = topk_kd_loss(student, ids, logp, mask)
    assert abs(kd.item()) < 1e-6
    kd.backward()
    assert student.grad is not None and student.grad.abs().max().item() < 1e-6
    uld = uld_loss(teacher_logits, logp, mask)
    assert abs(uld.item()) < 1e-6
    for scale in (0.3, 1.0):
        other = teacher_logits + scale * torch.from_numpy(
            rng.normal(size=(1, 6, V)).astype(np.float32)
        )
        assert topk_kd_loss(other, ids, logp, mask).item() > kd.item() + 1e-4
        assert uld_loss(other, logp, mask).item() > uld.item() + 1e-4


@pytest.mark.parametrize("seed", [0, 3])
def test_uld_matches_the_per_position_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    B, T, V, k = 2, 4, 19, 6
    _, logp = _teacher_topk(rng, B, T, V, k)
    logp = logp[..., torch.randperm(k)]  # any order: ULD sorts
    student = torch.from_numpy(rng.normal(size=(B, T, V)).astype(np.float32))
    mask = torch.from_numpy(rng.random((B, T)) < 0.8)
    mask[1, 1] = True
    got = uld_loss(student, logp, mask)
    assert_fp32_close(got.item(), reference_uld(student.double(), logp.double(), mask))


def test_uld_ignores_the_vocabulary_order_of_the_student() -> None:
    """ULD compares sorted vectors: permuting the student's vocabulary changes nothing."""
    rng = np.random.default_rng(11)
    _, logp = _teacher_topk(rng, 1, 3, 9, 4)
    student = torch.from_numpy(rng.normal(size=(1, 3, 9)).astype(np.float32))
    mask = torch.ones(1, 3, dtype=torch.bool)
    permuted = student[..., torch.randperm(9)]
    assert_fp32_close(uld_loss(student, logp, mask).item(), uld_loss(permuted, logp, mask).item())


def reference_edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance by the textbook full table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1,
                table[i][j - 1] + 1,
                table[i - 1][j - 1] + (a[i - 1] != b[j - 1]),
            )
    return table[len(a)][len(b)]


def test_mined_map_is_the_minimum_edit_distance_student_token() -> None:
    rng = np.random.default_rng(0)
    alphabet = b"abcde "
    teacher = [bytes(rng.choice(list(alphabet), rng.integers(1, 7))) for _ in range(60)]
    student = [bytes(rng.choice(list(alphabet), rng.integers(1, 5))) for _ in range(40)]
    student[3] = teacher[10]  # an exact match must win
    got = mined_vocab_map(teacher, student)
    assert got[10] == 3 or student[int(got[10])] == teacher[10]
    for tid, token in enumerate(teacher):
        distances = [reference_edit_distance(token, s) for s in student]
        best = min(distances)
        assert got[tid] == distances.index(best), (tid, token)  # smallest id among the nearest


def test_mined_map_maps_only_the_requested_ids() -> None:
    teacher = [b"ab", b"cd", b"ef"]
    student = [b"a", b"cd"]
    got = mined_vocab_map(teacher, student, teacher_ids=np.array([1, 1]))
    assert got.tolist() == [-1, 1, -1]


def test_mined_kl_is_the_forward_kl_of_the_mapped_teacher_distribution() -> None:
    rng = np.random.default_rng(3)
    V_teacher, V_student, k = 14, 9, 5
    ids, logp = _teacher_topk(rng, 1, 4, V_teacher, k)
    teacher_to_student = torch.from_numpy(
        rng.integers(0, V_student, V_teacher)
    )  # collisions on purpose
    student = torch.from_numpy(rng.normal(size=(1, 4, V_student)).astype(np.float32))
    mask = torch.tensor([[True, False, True, True]])
    got = mined_kl_loss(student, ids, logp, mask, teacher_to_student)
    want = reference_topk_kl(student.double(), teacher_to_student[ids], logp.double(), mask)
    assert_fp32_close(got.item(), want)


def test_one_to_one_chunks_pair_the_predicting_positions() -> None:
    # chunks: [0,1)↔[0,1) at position 0 (nothing predicts it), [1,2)↔[1,3) (1:2), [2,3)↔[3,4) (1:1),
    # [3,5)↔[4,5) (2:1), [5,6)↔[5,6) (1:1 but outside the loss region), [6,7)↔[6,7) (1:1, a block)
    chunks = Chunks(
        teacher_start=np.array([0, 1, 2, 3, 5, 6]),
        teacher_end=np.array([1, 2, 3, 5, 6, 7]),
        student_start=np.array([0, 1, 3, 4, 5, 6]),
        student_end=np.array([1, 3, 4, 5, 6, 7]),
        start_byte=np.zeros(6, dtype=np.int64),
        end_byte=np.zeros(6, dtype=np.int64),
        is_block=np.array([False, False, False, False, False, True]),
        in_loss=np.array([True, True, True, True, False, True]),
    )
    teacher_pos, student_pos = one_to_one_chunk_positions(chunks)
    assert teacher_pos.tolist() == [1] and student_pos.tolist() == [2]


def test_lazy_mined_map_equals_the_full_map_and_keeps_fixed_ids() -> None:
    rng = np.random.default_rng(5)
    alphabet = b"xyz ab"
    teacher = [bytes(rng.choice(list(alphabet), rng.integers(1, 6))) for _ in range(30)]
    student = [bytes(rng.choice(list(alphabet), rng.integers(1, 4))) for _ in range(20)]
    full = mined_vocab_map(teacher, student)
    lazy = MinedVocabMap(teacher, student, fixed={0: 7})
    ids = rng.integers(0, 30, size=(4, 3))
    got = lazy(ids)
    assert got.shape == (4, 3)
    want = np.where(ids == 0, 7, full[ids])
    assert got.tolist() == want.tolist()
    assert lazy(np.arange(30)).tolist() == [7, *full[1:].tolist()]  # cached and new ids agree
