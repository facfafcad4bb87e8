"""The ALM loss (ALM_SPEC.md §5–§6) against the per-group reference loop: values, gradients, limit cases,
padding and micro-batch invariance, pinned numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference.alm_reference import (
    reference_align,
    reference_divergence,
    reference_groups,
    reference_loss,
)

from alm import align_chunks, alm_loss, binarised_divergence
from alm.align import build_alm_targets
from alm.errors import AlmError
from alm.losses.alm import (
    DIVERGENCES,
    alm_batch_loss,
    alm_live_teacher_loss,
    sequence_logp_and_boundary_logmass,
    token_stats,
)
from alm.losses.batch import pad_targets

torch.set_num_threads(1)


# --- divergences ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 5.0, 100.0])
def test_divergences_match_their_bernoulli_definitions(divergence, temperature):
    teacher = torch.tensor([-0.01, -0.7, -3.0, -40.0, -250.0, -1.5, 0.0], dtype=torch.float64)
    student = torch.tensor(
        [-0.02, -0.3, -5.0, -39.0, -260.0, -1.5, -0.2], dtype=torch.float64, requires_grad=True
    )
    student32 = student.detach().float().requires_grad_()
    got = binarised_divergence(
        teacher.float(), student32, temperature=temperature, divergence=divergence
    )
    want = reference_divergence(teacher, student, temperature, divergence)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(student32.grad.double(), student.grad, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_and_gradients_stay_finite_at_extremes(divergence):
    teacher = torch.tensor([0.0, 0.0, -1e-9, -1e4, -1e30, -1e4, 0.0, -math.inf, -1.0])
    student = torch.tensor(
        [0.0, -1e4, 0.0, 0.0, -1e30, -1e4, -1e-9, -1.0, -math.inf], requires_grad=True
    )
    value = binarised_divergence(teacher, student, temperature=100.0, divergence=divergence)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(student.grad).all()


def test_binary_ce_of_equal_inputs_is_the_teacher_binary_entropy_with_zero_gradient():
    teacher = torch.tensor([-0.5, -20.0, -300.0])
    student = teacher.clone().requires_grad_()
    value = binarised_divergence(teacher, student)
    p = torch.exp(teacher.double() / 100 - 1e-6)
    entropy = -(p * torch.log(p) + (1 - p) * torch.log1p(-p))
    torch.testing.assert_close(value.double(), entropy, rtol=1e-5, atol=1e-7)
    value.sum().backward()
    assert student.grad.abs().max() < 1e-5


def test_unknown_divergence_names_the_choices():
    with pytest.raises(AlmError, match="binary_ce"):
        binarised_divergence(torch.zeros(1), torch.zeros(1), divergence="kl")


# --- student statistics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_match_log_softmax_with_padded_vocab(dtype):
    torch.manual_seed(0)
    rows, vocab, padded = 37, 50, 64
    logits = (torch.randn(rows, padded) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,))
    target[5] = -1
    mask = torch.rand(padded) < 0.3
    mask[0] = True
    logp, boundary = token_stats(logits, target, mask, vocab_size=vocab, block_bytes=7 * 4 * vocab)
    reference = logits.float()[:, :vocab].double()
    logsm = torch.log_softmax(reference, -1)
    want_logp = torch.where(target >= 0, logsm.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0)
    want_boundary = torch.logsumexp(logsm.masked_fill(~mask[:vocab], -math.inf), -1)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boundary.double(), want_boundary, rtol=1e-5, atol=1e-5)
    weights_a, weights_b = torch.randn(rows), torch.randn(rows)
    (logp * weights_a + boundary * weights_b).sum().backward()
    reference_leaf = logits.detach().float().double().requires_grad_()
    logsm = torch.log_softmax(reference_leaf[:, :vocab], -1)
    want = (
        torch.where(target >= 0, logsm.gather(1, target.clamp(min=0)[:, None])[:, 0], 0.0)
        * weights_a
    ).sum() + (torch.logsumexp(logsm.masked_fill(~mask[:vocab], -math.inf), -1) * weights_b).sum()
    want.backward()
    assert logits.grad.dtype == dtype
    assert (logits.grad[:, vocab:] == 0).all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        logits.grad.double(), reference_leaf.grad, rtol=tolerance, atol=tolerance
    )


def test_empty_boundary_mask_is_refused():
    with pytest.raises(AlmError, match="no token"):
        token_stats(
            torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.bool)
        )


# --- the whole loss against the reference ---------------------------------------------------------------------


def random_example(rng: np.random.Generator, vocab: int, student_length: int | None = None):
    """A random text split two ways with a block at the start and sometimes in the middle; random teacher values."""
    text = bytes(rng.integers(97, 101, size=int(rng.integers(4, 30))).tolist())
    cut = int(rng.integers(0, len(text)))
    teacher, teacher_roles, student, student_roles = [b""], ["bos"], [b""], ["bos"]
    for part_index, part in enumerate((text[:cut], text[cut:])):
        if part_index == 1 and rng.random() < 0.5:
            teacher, teacher_roles = [*teacher, b"", b""], [*teacher_roles, "eot", "eot"]
            student, student_roles = [*student, b""], [*student_roles, "eot"]
        for tokens, roles, longest in ((teacher, teacher_roles, 4), (student, student_roles, 2)):
            pos = 0
            while pos < len(part):
                step = int(rng.integers(1, longest + 1))
                tokens.append(part[pos : pos + step])
                roles.append(None)
                pos += step
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles
    )
    teacher_logp = np.concatenate([[np.nan], -rng.exponential(2.0, size=len(teacher) - 1)])
    teacher_boundary = np.log(rng.uniform(0.01, 0.6, size=len(teacher)))
    length = student_length or len(student)
    student_ids = rng.integers(0, vocab, size=length)
    ref = reference_groups(
        reference_align(teacher, student, teacher_roles, student_roles),
        teacher_logp.tolist(),
        teacher_boundary.tolist(),
        0.1,
        True,
    )
    tokens = (teacher, student, teacher_roles, student_roles)
    return chunks, teacher_logp, teacher_boundary, student_ids, len(student), ref, tokens


def random_batch(seed: int, batch: int = 3, vocab: int = 23, padded_vocab: int = 32):
    rng = np.random.default_rng(seed)
    examples = [random_example(rng, vocab) for _ in range(batch)]
    length = max(e[4] for e in examples) + 2  # right padding
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : example[4]] = torch.from_numpy(example[3])
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, padded_vocab, generator=generator) * 2
    mask = torch.rand(padded_vocab, generator=generator) < 0.3
    mask[0] = True
    return examples, ids, logits, mask, vocab


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("seed", range(4))
def test_alm_loss_matches_the_reference_loop_in_value_and_gradient(seed, divergence):
    examples, ids, logits, mask, vocab = random_batch(seed)
    temperature = 3.0 if seed % 2 else 100.0
    logits_vec = logits.clone().requires_grad_()
    out = alm_batch_loss(
        logits_vec,
        ids,
        mask,
        [e[0] for e in examples],
        [e[1] for e in examples],
        [e[2] for e in examples],
        temperature=temperature,
        divergence=divergence,
        vocab_size=vocab,
    )
    logits_ref = logits.double().requires_grad_()
    want = reference_loss(
        list(logits_ref),
        [i.tolist() for i in ids],
        mask,
        [e[5] for e in examples],
        temperature=temperature,
        divergence=divergence,
        vocab_size=vocab,
    )
    assert out.num_groups.item() == sum(len(e[5]) for e in examples) > 0
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=1e-7)
    out.loss.backward()
    want.backward()
    torch.testing.assert_close(logits_vec.grad.double(), logits_ref.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_debias_switch_matches_the_reference_with_and_without_boundary_terms(seed, debias):
    rng = np.random.default_rng(100 + seed)
    vocab = 23
    examples = [random_example(rng, vocab) for _ in range(3)]
    length = max(e[4] for e in examples) + 1
    ids = torch.zeros(3, length, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : example[4]] = torch.from_numpy(example[3])
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, length, 32, generator=generator) * 2
    mask = torch.rand(32, generator=generator) < 0.3
    mask[0] = True
    groups = []
    for example in examples:
        chunks = reference_align(*example[6])
        groups.append(
            reference_groups(chunks, example[1].tolist(), example[2].tolist(), 0.1, True, debias)
        )
    logits_vec = logits.clone().requires_grad_()
    out = alm_batch_loss(
        logits_vec,
        ids,
        mask,
        [e[0] for e in examples],
        [e[1] for e in examples],
        [e[2] for e in examples],
        vocab_size=vocab,
        debias=debias,
    )
    logits_ref = logits.double().requires_grad_()
    common = {"vocab_size": vocab, "debias": debias}
    want = reference_loss(list(logits_ref), [i.tolist() for i in ids], mask, groups, **common)
    assert out.num_groups.item() == sum(len(g) for g in groups) > 0
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=1e-7)
    out.loss.backward()
    want.backward()
    torch.testing.assert_close(logits_vec.grad.double(), logits_ref.grad, rtol=1e-3, atol=1e-6)
    want_excess = reference_loss(
        list(logits.double()), [i.tolist() for i in ids], mask, groups, excess=True, **common
    )
    # float64 from fp32 group log-probs: relative to the loss, the excess is as exact as the loss itself
    assert abs(out.excess.item() - want_excess.item()) <= 1e-4 * want.item()


def test_debiasing_changes_the_loss_so_the_switch_is_live():
    examples, ids, logits, mask, vocab = random_batch(0)
    args = (logits, ids, mask, [e[0] for e in examples], [e[1] for e in examples])
    on = alm_batch_loss(*args, [e[2] for e in examples], vocab_size=vocab)
    off = alm_batch_loss(*args, [e[2] for e in examples], vocab_size=vocab, debias=False)
    assert on.num_groups == off.num_groups and abs(on.loss.item() - off.loss.item()) > 1e-4


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_excess_is_the_loss_above_the_teachers_floor(divergence):
    # binary_ce: the binary KL (loss minus the teacher's binary entropy); other divergences: floor 0.
    examples, ids, logits, mask, vocab = random_batch(1)
    out = alm_batch_loss(
        logits,
        ids,
        mask,
        [e[0] for e in examples],
        [e[1] for e in examples],
        [e[2] for e in examples],
        vocab_size=vocab,
        divergence=divergence,
    )
    want = reference_loss(
        list(logits.double()),
        [i.tolist() for i in ids],
        mask,
        [e[5] for e in examples],
        divergence=divergence,
        vocab_size=vocab,
        excess=True,
    )
    assert out.excess.dtype == torch.float64 and out.excess.item() >= 0
    assert abs(out.excess.item() - want.item()) <= 1e-4 * max(out.loss.item(), 1e-3)
    if divergence == "binary_ce":
        assert out.excess.item() < 0.5 * out.loss.item()  # at tau = 100 the floor dominates
    else:
        assert out.excess.item() == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)


def pinned_case():
    """`<bos>The cat sat` with teacher `The| cat| sat` and student `T|he| c|at| sat` (§5 worked example)."""
    teacher = [b"", b"The", b" cat", b" sat"]
    student = [b"", b"T", b"he", b" c", b"at", b" sat"]
    roles_t, roles_s = ["bos", None, None, None], ["bos", None, None, None, None, None]
    chunks = align_chunks(teacher, student, teacher_roles=roles_t, student_roles=roles_s)
    teacher_logp = np.array([np.nan, -1.0, -2.0, -0.5])
    teacher_boundary = np.log([0.5, 0.05, 0.3, 0.9])
    ids = torch.tensor([[0, 1, 2, 3, 1, 2]])
    logits = torch.tensor(
        [
            [
                [0.0, 1.0, -1.0, 0.5],
                [2.0, 0.0, 1.0, -1.0],
                [0.0, 0.0, 0.0, 3.0],
                [1.0, -2.0, 0.5, 0.0],
                [0.0, 2.0, 1.0, 0.0],
                [1.0, 1.0, 1.0, 1.0],
            ]
        ]
    )
    mask = torch.tensor([True, False, False, True])
    return chunks, teacher_logp, teacher_boundary, ids, logits, mask


def test_pinned_loss_value():
    chunks, teacher_logp, teacher_boundary, ids, logits, mask = pinned_case()
    out = alm_batch_loss(logits, ids, mask, [chunks], [teacher_logp], [teacher_boundary])
    # By hand: groups "The cat" (student tokens 1..4, boundary read at student position 4) and " sat".
    logsm = torch.log_softmax(logits[0].double(), -1)
    student_the_cat = sum(logsm[q - 1, ids[0, q]] for q in range(1, 5)) + torch.logsumexp(
        logsm[4][mask], 0
    )
    student_sat = logsm[4, ids[0, 5]] + torch.logsumexp(logsm[5][mask], 0)
    teacher = torch.tensor([-3.0 + math.log(0.3), -0.5 + math.log(0.9)], dtype=torch.float64)
    want = reference_divergence(
        teacher, torch.stack([student_the_cat, student_sat]), 100.0, "binary_ce"
    ).mean()
    assert want.item() == pytest.approx(PINNED_LOSS, rel=1e-9)
    assert out.loss.item() == pytest.approx(PINNED_LOSS, rel=1e-5)
    assert out.num_groups.item() == 2


PINNED_LOSS = 0.11321597791226107


def test_student_equal_to_teacher_gives_zero_gradient_and_the_teacher_entropy():
    torch.manual_seed(0)
    vocab, length = 40, 16
    ids = torch.randint(0, vocab, (2, length))
    logits = torch.randn(2, length, vocab) * 2
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[:8] = True
    teacher_logp, teacher_boundary = sequence_logp_and_boundary_logmass(logits, ids, mask)
    tokens = [bytes([65 + i % 26]) for i in range(length)]
    chunks = [align_chunks(tokens, tokens)] * 2
    student = logits.clone().requires_grad_()
    out = alm_live_teacher_loss(student, ids, mask, chunks, teacher_logp, teacher_boundary)
    out.loss.backward()
    assert student.grad.abs().max() < 1e-6
    assert out.mean_abs_logp_diff.item() < 1e-5
    targets = [
        build_alm_targets(c, lp.numpy(), b.numpy())
        for c, lp, b in zip(chunks, teacher_logp, teacher_boundary)
    ]
    group_logp = torch.from_numpy(np.concatenate([t.teacher_group_logp for t in targets])).double()
    p = torch.exp(group_logp / 100 - 1e-6)
    entropy = -(p * torch.log(p) + (1 - p) * torch.log1p(-p))
    assert out.loss.item() == pytest.approx(entropy.mean().item(), rel=1e-4)


def test_padding_does_not_change_loss_or_gradient():
    examples, ids, logits, mask, vocab = random_batch(seed=7, batch=2)
    targets = pad_targets([build_alm_targets(e[0], e[1], e[2]) for e in examples])
    base = logits.clone().requires_grad_()
    out = alm_loss(base, ids, mask, targets, vocab_size=vocab)
    out.loss.backward()
    # Pad five more positions and one more (empty) example; pad the group tables wider.
    wide_logits = torch.cat([logits, torch.randn(2, 5, logits.shape[-1])], 1)
    wide_logits = torch.cat(
        [wide_logits, torch.randn(1, *wide_logits.shape[1:])], 0
    ).requires_grad_()
    wide_ids = torch.cat(
        [
            torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1),
            torch.zeros(1, ids.shape[1] + 5, dtype=torch.long),
        ],
        0,
    )
    padded = pad_targets(
        [build_alm_targets(e[0], e[1], e[2]) for e in examples]
        + [build_alm_targets(align_chunks([b"a"], [b"a"]), np.array([np.nan]), np.zeros(1))]
    )
    out_wide = alm_loss(wide_logits, wide_ids, mask, padded, vocab_size=vocab)
    out_wide.loss.backward()
    assert out_wide.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    torch.testing.assert_close(wide_logits.grad[:2, : ids.shape[1]], base.grad)
    assert (
        wide_logits.grad[:, ids.shape[1] :].abs().max() == 0
        and wide_logits.grad[2].abs().max() == 0
    )


def test_splitting_a_batch_into_micro_batches_keeps_the_gradient():
    examples, ids, logits, mask, vocab = random_batch(seed=3, batch=4)
    targets = [build_alm_targets(e[0], e[1], e[2]) for e in examples]
    full = logits.clone().requires_grad_()
    out = alm_loss(full, ids, mask, pad_targets(targets), vocab_size=vocab)
    out.loss.backward()
    total_groups = sum(t.num_groups for t in targets)
    split = logits.clone().requires_grad_()
    summed = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        part_out = alm_loss(
            split[part],
            ids[part],
            mask,
            pad_targets(targets[part]),
            num_valid_groups_global=total_groups,
            vocab_size=vocab,
        )
        part_out.loss.backward()
        summed += part_out.loss.item()
    assert summed == pytest.approx(out.loss.item(), rel=1e-6)
    torch.testing.assert_close(split.grad, full.grad, rtol=1e-5, atol=1e-8)


def test_token_stats_stay_exact_when_the_boundary_mass_underflows():
    torch.manual_seed(1)
    logits = torch.randn(6, 20) * 2
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:3] = True
    logits[:3, :3] -= 150.0  # boundary mass ~ e^-150 in three rows: below the rescaling range
    leaf = logits.clone().requires_grad_()
    target = torch.arange(6) + 5
    logp, boundary = token_stats(leaf, target, mask)
    (logp.sum() + boundary.sum()).backward()
    reference = logits.double().requires_grad_()
    logsm = torch.log_softmax(reference, -1)
    want_boundary = torch.logsumexp(logsm.masked_fill(~mask, -math.inf), -1)
    want = logsm.gather(1, target[:, None])[:, 0].sum() + want_boundary.sum()
    want.backward()
    assert torch.isfinite(boundary).all() and boundary[:3].max() < -140
    torch.testing.assert_close(boundary.double(), want_boundary, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-4, atol=1e-5)


def test_a_group_ending_on_a_template_block_has_no_boundary_term_on_either_side():
    # Text "ab" then an eot block (two teacher tokens, one student token); every boundary probability is 0.5 > γ,
    # so each chunk is its own group. The block group is the plain sum of log-probs on both sides (issue 8 item 4).
    teacher, teacher_roles = [b"", b"ab", b"", b""], ["bos", None, "eot", "eot"]
    student, student_roles = [b"", b"a", b"b", b""], ["bos", None, None, "eot"]
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles
    )
    teacher_logp = np.array([np.nan, -1.0, -2.0, -0.5])
    teacher_boundary = np.full(4, math.log(0.5))
    targets = build_alm_targets(chunks, teacher_logp, teacher_boundary)
    assert targets.group_has_boundary_term.tolist() == [True, False]
    np.testing.assert_allclose(targets.teacher_group_logp, [-1.0 + math.log(0.5), -2.5], rtol=1e-6)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 6, generator=generator, dtype=torch.float64)
    ids = torch.tensor([[5, 1, 2, 4]])
    boundary_mask = torch.tensor([True, False, False, True, True, True])
    out = alm_batch_loss(
        logits.float(),
        ids,
        boundary_mask,
        [chunks],
        [teacher_logp],
        [teacher_boundary],
        divergence="abs",
    )
    logsm = torch.log_softmax(logits[0], dim=-1)
    student_text = logsm[0, 1] + logsm[1, 2] + torch.logsumexp(logsm[2][boundary_mask], 0)
    student_block = logsm[2, 4]  # no boundary mass after the block
    want = (abs(-1.0 + math.log(0.5) - student_text) + abs(-2.5 - student_block)) / 2
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
