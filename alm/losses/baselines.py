"""Baseline distillation losses trained from a store's top-k (issue 12 item 2; `docs/training.md`, "Baselines").

Owns the loss maths of three baselines, each a function of tensors returning an fp32 scalar, and the numpy helpers
they need to turn stored teacher values into their inputs:

- `topk_kd_loss`: same-tokenizer offline KD, the standard recipe of DistillKit and Megatron-LM: forward KL
  KL(p_T || p_S) over the teacher's stored top-k, with the missing mass on both sides as one tail bucket.
- `uld_loss`: Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): L1 distance between the
  teacher's and the student's probability vectors each sorted in decreasing order, so no vocabulary mapping is
  needed; from a stored top-k, the first k sorted entries plus the two tail masses (a lower bound of the full L1 by
  the triangle inequality; equal to it when the teacher's top-k holds all its mass).
- `mined_kl_loss` with `mined_vocab_map` and `one_to_one_chunk_positions`: MinED (Wan et al. 2024, FuseLLM,
  arXiv 2401.10491): each teacher token is mapped to the student token whose bytes are at minimum edit distance
  (exact matches first), the teacher's top-k distribution is carried to the student vocabulary through that map
  (probabilities of teacher tokens mapped to one student token add up), and the forward KL is taken at positions
  whose aligned chunk is one teacher token and one student token. FuseLLM trains λ·CE + (1 − λ)·this with λ = 0.9.

DSKD (Zhang et al. 2024) is not here: it projects hidden states between the two models' spaces and needs the
teacher's full logits and hidden states at every position during training, which an offline store does not hold
(see `docs/training.md`). Glossary: B batch, T positions, V student vocabulary, k stored top-k. Must not import
`alm.config`.
"""

from __future__ import annotations

import numpy as np
import torch

from alm.align.chunks import Chunks


def _student_logp(student_logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """fp32 log-softmax over the real vocabulary (padded columns ≥ vocab_size dropped)."""
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits
    return torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]


def _mean_over(
    values: torch.Tensor, mask: torch.Tensor, num_positions_global: float | torch.Tensor | None
):
    values = torch.where(mask, values, torch.zeros_like(values))
    normaliser = mask.sum().clamp(min=1) if num_positions_global is None else num_positions_global
    return values.sum() / normaliser


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_topk_id: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    num_positions_global: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean over masked positions of KL(p_T || p_S) on the teacher's support plus one tail bucket.

    The teacher's k entries may name the same student id more than once (after a vocabulary map); their
    probabilities add up. With S the set of named ids, p_tail = max(0, 1 − Σ_S p_T) and q_tail = 1 − Σ_S p_S:
    KL = Σ_{v∈S} p_T(v) (log p_T(v) − log p_S(v)) + p_tail (log p_tail − log q_tail), with 0·log 0 = 0.

    Args:
        student_logits: [B, T, V'] logits at the positions whose next-token distribution is matched.
        teacher_topk_id: int64 [B, T, k], student-vocabulary ids of the teacher's top-k (in range even where
            masked).
        teacher_topk_logp: float [B, T, k], the teacher's natural-log probabilities of those entries.
        position_mask: bool [B, T], True where the position is trained.
        num_positions_global: the trained positions of the whole optimizer step; None uses this batch's count.
        vocab_size: real student vocabulary size when the logits are padded.

    Returns:
        fp32 scalar, ≥ 0 up to rounding; 0 exactly when the student equals the teacher on S and on the tail.
    """
    student_logp = _student_logp(student_logits, vocab_size)  # [B, T, V]
    ids = teacher_topk_id.long()
    teacher_prob = torch.zeros_like(student_logp).scatter_add_(
        -1, ids, teacher_topk_logp.float().exp()
    )  # [B, T, V]; duplicates add
    support = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, ids, True)  # [B, T, V]
    on_support = torch.where(
        support,
        torch.xlogy(teacher_prob, teacher_prob) - teacher_prob * student_logp,
        torch.zeros_like(student_logp),
    ).sum(-1)  # [B, T]
    teacher_tail = (1.0 - teacher_prob.sum(-1)).clamp(min=0.0)  # [B, T]
    student_tail_logmass = torch.logsumexp(
        student_logp.masked_fill(support, float("-inf")), dim=-1
    )  # [B, T]; -inf when S covers the vocabulary
    tail = torch.where(
        teacher_tail > 0,
        torch.xlogy(teacher_tail, teacher_tail) - teacher_tail * student_tail_logmass,
        torch.zeros_like(teacher_tail),
    )
    return _mean_over(on_support + tail, position_mask, num_positions_global)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_id: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    num_positions_global: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Same-tokenizer top-k KD: `topk_forward_kl` with the stored teacher ids used as student ids.

    The student and teacher share a tokenizer, so the student's position q is the teacher's position q and the
    stored `topk_id`/`topk_logp` at q (the distribution predicting token q+1) pair with the student's logits at q.
    Arguments and result as `topk_forward_kl`.
    """
    return topk_forward_kl(
        student_logits,
        teacher_topk_id,
        teacher_topk_logp,
        position_mask,
        num_positions_global=num_positions_global,
        vocab_size=vocab_size,
    )


def uld_loss(
    student_logits: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    num_positions_global: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """ULD from a stored top-k: mean over positions of Σ_i |s_(i) − t_(i)| + |s_tail − t_tail|.

    t_(1) ≥ ... ≥ t_(k) are the teacher's top-k probabilities sorted, s_(1) ≥ ... ≥ s_(k) the student's k largest,
    and each tail is 1 minus its side's k-sum (the teacher's clamped at 0). Positions pair by index, as in the
    paper (the t-th student prediction with the t-th teacher prediction); the caller chooses them. ULD's paper
    trains CE + λ·ULD.

    Args:
        student_logits: [B, T, V'].
        teacher_topk_logp: float [B, T, k] (any order).
        position_mask: bool [B, T].
        num_positions_global: the trained positions of the whole optimizer step; None uses this batch's count.
        vocab_size: real student vocabulary size when the logits are padded.

    Returns:
        fp32 scalar in [0, 2]; 0 when the student's sorted top-k probabilities and tail equal the teacher's.
    """
    k = teacher_topk_logp.shape[-1]
    student_prob = _student_logp(student_logits, vocab_size).exp()  # [B, T, V]
    student_sorted = torch.topk(student_prob, k, dim=-1, sorted=True).values  # [B, T, k]
    teacher_sorted = torch.sort(teacher_topk_logp.float().exp(), dim=-1, descending=True).values
    student_tail = (1.0 - student_sorted.sum(-1)).clamp(min=0.0)  # [B, T]
    teacher_tail = (1.0 - teacher_sorted.sum(-1)).clamp(min=0.0)
    distance = (student_sorted - teacher_sorted).abs().sum(-1) + (student_tail - teacher_tail).abs()
    return _mean_over(distance, position_mask, num_positions_global)


def mined_kl_loss(
    student_logits: torch.Tensor,
    teacher_topk_id: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    position_mask: torch.Tensor,
    teacher_to_student_id: torch.Tensor,
    *,
    num_positions_global: float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """MinED's distribution loss: the teacher's top-k carried through the MinED map, then `topk_forward_kl`.

    Args:
        student_logits: [B, T, V'] at the student positions predicting a 1:1 chunk's token
            (`one_to_one_chunk_positions`).
        teacher_topk_id: int64 [B, T, k], teacher-vocabulary ids at the paired teacher positions.
        teacher_topk_logp: float [B, T, k].
        position_mask: bool [B, T].
        teacher_to_student_id: int64 [V_teacher], the MinED map (`mined_vocab_map`).
        num_positions_global, vocab_size: as `topk_forward_kl`.

    Returns:
        fp32 scalar (FuseLLM trains 0.9·CE + 0.1·this).
    """
    mapped = teacher_to_student_id.to(teacher_topk_id.device)[teacher_topk_id.long()]  # [B, T, k]
    return topk_forward_kl(
        student_logits,
        mapped,
        teacher_topk_logp,
        position_mask,
        num_positions_global=num_positions_global,
        vocab_size=vocab_size,
    )


def _edit_distance(a: bytes, b: bytes, bound: int) -> int:
    """Levenshtein distance of two byte strings (unit costs); any value ≥ `bound` may be returned as `bound`."""
    if abs(len(a) - len(b)) >= bound:
        return bound
    previous = list(range(len(b) + 1))
    for i, byte_a in enumerate(a, start=1):
        current = [i]
        for j, byte_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (byte_a != byte_b))
            )
        if min(current) >= bound:
            return bound
        previous = current
    return previous[-1]


def mined_vocab_map(
    teacher_token_bytes: list[bytes],
    student_token_bytes: list[bytes],
    teacher_ids: np.ndarray | None = None,
) -> np.ndarray:
    """The MinED vocabulary map: each teacher id → the student id whose bytes are at minimum edit distance.

    A student token with the same bytes wins (distance 0); ties go to the smallest student id, so the map is
    deterministic. Tokens without bytes (specials) map to a student token without bytes when there is one.

    Args:
        teacher_token_bytes: bytes of each teacher id (index = id).
        student_token_bytes: bytes of each student id.
        teacher_ids: the teacher ids to map (e.g. the unique `topk_id` of a store); None maps all. Others get -1.

    Returns:
        int64 [V_teacher].
    """
    by_bytes: dict[bytes, int] = {}
    for sid, token in enumerate(student_token_bytes):
        by_bytes.setdefault(token, sid)
    by_length: dict[int, list[int]] = {}
    for sid, token in enumerate(student_token_bytes):
        by_length.setdefault(len(token), []).append(sid)
    out = np.full(len(teacher_token_bytes), -1, dtype=np.int64)
    wanted = range(len(teacher_token_bytes)) if teacher_ids is None else np.unique(teacher_ids)
    for tid in wanted:
        token = teacher_token_bytes[int(tid)]
        if token in by_bytes:
            out[tid] = by_bytes[token]
            continue
        best_sid, best = -1, len(token) + max(by_length, default=0) + 1
        # candidates in order of length difference: a length gap d costs at least d edits
        for gap in range(best + 1):
            if gap > best:
                break
            lengths = {len(token) - gap, len(token) + gap}
            for sid in sorted(s for n in lengths if n >= 0 for s in by_length.get(n, [])):
                # capped at best + 1, so any value ≤ best is the true distance
                distance = _edit_distance(token, student_token_bytes[sid], best + 1)
                if distance < best or (distance == best and sid < best_sid):
                    best_sid, best = sid, distance
        out[tid] = best_sid
    return out


def one_to_one_chunk_positions(chunks: Chunks) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) positions predicting each loss-region chunk made of one token on each side.

    MinED compares next-token distributions only where the two tokenizations agree token for token: a chunk
    [t, t+1) ↔ [s, s+1) pairs the teacher's distribution at t − 1 (stored `topk_*` at t − 1 predicts token t) with
    the student's logits at s − 1. Chunks at position 0 (nothing predicts them) and template blocks are skipped.

    Returns:
        int64 [P] teacher positions and int64 [P] student positions.
    """
    keep = (
        (chunks.teacher_end - chunks.teacher_start == 1)
        & (chunks.student_end - chunks.student_start == 1)
        & (chunks.teacher_start >= 1)
        & (chunks.student_start >= 1)
        & chunks.in_loss
        & ~chunks.is_block
    )
    return (
        (chunks.teacher_start[keep] - 1).astype(np.int64),
        (chunks.student_start[keep] - 1).astype(np.int64),
    )


class MinedVocabMap:
    """`mined_vocab_map` filled lazily: only teacher ids that occur (in stored top-k) are ever searched.

    The full map costs V_teacher × V_student edit distances; a store's top-k names far fewer teacher ids, so the
    map is computed per new id and cached (one cache per DataLoader worker). `fixed` pre-maps ids (e.g. special
    tokens by role) that the edit distance must not decide.
    """

    def __init__(
        self,
        teacher_token_bytes: list[bytes],
        student_token_bytes: list[bytes],
        fixed: dict[int, int] | None = None,
    ) -> None:
        self.teacher_token_bytes = list(teacher_token_bytes)
        self.student_token_bytes = list(student_token_bytes)
        self._map = np.full(len(self.teacher_token_bytes), -1, dtype=np.int64)
        for teacher_id, student_id in (fixed or {}).items():
            self._map[teacher_id] = student_id

    def __call__(self, teacher_ids: np.ndarray) -> np.ndarray:
        """Student ids (int64, same shape) for `teacher_ids` (int, each in [0, V_teacher))."""
        ids = np.asarray(teacher_ids, dtype=np.int64)
        missing = np.unique(ids[self._map[ids] < 0])
        if missing.size:
            found = mined_vocab_map(self.teacher_token_bytes, self.student_token_bytes, missing)
            self._map[missing] = found[missing]
        return self._map[ids]
