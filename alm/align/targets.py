"""Teacher-side ALM targets of one example: chunk sums, γ-merging and debiasing (ALM_SPEC.md §5.1–§5.3, §7.1).

Owns `AlmTargets`, `build_alm_targets` and `chunk_logp_sums`. Every teacher quantity is stored, so the teacher's whole side of the
loss is computed here, on CPU in the data path; the model side (`alm.losses.alm`) only adds the student's sums.
NumPy only: must not import torch or `alm.config`.

Choices where the spec leaves room (documented in docs/alm.md):

- Merging runs on the compact list of in-loss chunks (§5.3 "empty chunks"). A group also ends where the next
  in-loss chunk is not adjacent on both sides (a gap left by the loss mask or a dropped token), so every group is a
  contiguous token range on both sides.
- `drop_unterminated_groups=True` (default) drops a group that ends on a text chunk whose teacher boundary
  probability is ≤ γ (the trailing group at truncation, or one forced to end by a gap): its debiasing factor is
  below γ, exactly the "erased chunk" case merging exists to avoid (§5.3 "trailing group", §13.6). A group that ends
  on a template block is kept: tokenization restarts after a block, so nothing is leaked across it.
- For the same reason a group that ends on a template block gets no boundary term (append_space, §5.2) on either
  side (`group_has_boundary_term` is False): the factor corrects the bias of a chunk whose tokenization could
  continue, and a block's cannot. After a header the teacher's boundary mass can be tiny (`user\n` is followed by
  text that seldom starts with a space: LT = −9.25 for `[<|im_start|>, user, \n]`) while a dummy-prefix
  SentencePiece student's next token always starts with `▁`, so the term would ask for what the student cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alm.align.chunks import Chunks
from alm.boundary import DEFAULT_BOUNDARY_CLASSES
from alm.errors import AlignmentError

_INT = np.int64


@dataclass(frozen=True)
class AlmTargets:
    """Per-example ALM targets. G = number of (merged) groups, C = number of greedy chunks (hidden-state loss).

    Attributes:
        teacher_group_logp: float32 [G], debiased teacher group log-prob: sum of the group's chunk log-probs
            (each clipped to ≤ 0) plus the teacher boundary log-mass at the group's last token (append_space)
            where `group_has_boundary_term`.
        teacher_group_start: int64 [G], first teacher token position of each group.
        teacher_group_end: int64 [G], one past the last teacher token position.
        student_group_start: int64 [G], first student token position.
        student_group_end: int64 [G], one past the last student token position.
        teacher_group_last_pos: int64 [G], `teacher_group_end - 1`.
        student_group_last_pos: int64 [G], `student_group_end - 1`; the student boundary log-mass is read here.
        teacher_chunk_last_pos: int64 [C], last teacher token of every aligned greedy (unmerged) chunk, loss mask
            not applied (§7.1).
        student_chunk_last_pos: int64 [C], the same on the student side.
        group_has_boundary_term: bool [G], whether the boundary log-mass at the group's last token is part of the
            group log-prob (append_space) on both sides: False for a group that ends on a template block.
    """

    teacher_group_logp: np.ndarray
    teacher_group_start: np.ndarray
    teacher_group_end: np.ndarray
    student_group_start: np.ndarray
    student_group_end: np.ndarray
    teacher_group_last_pos: np.ndarray
    student_group_last_pos: np.ndarray
    teacher_chunk_last_pos: np.ndarray
    student_chunk_last_pos: np.ndarray
    group_has_boundary_term: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.teacher_group_logp)

    @property
    def num_chunks(self) -> int:
        return len(self.teacher_chunk_last_pos)


def build_alm_targets(
    chunks: Chunks,
    teacher_logp: np.ndarray,
    teacher_boundary_logmass: np.ndarray,
    *,
    gamma: float = 0.1,
    drop_unterminated_groups: bool = True,
    debias: bool = True,
) -> AlmTargets:
    """Teacher chunk log-probs, γ-merged groups and debiased group log-probs for one example.

    Args:
        chunks: the example's chunks from `align_sequences` (chunks with `in_loss=False` only feed the
            hidden-state positions).
        teacher_logp: float [n], `logp[q] = log p_T(token_q | tokens[:q])`, NaN at q = 0 (never used: no chunk
            contains position 0). Summed in float64 by prefix sums.
        teacher_boundary_logmass: float [n], log of the teacher's next-token probability mass on the chosen
            boundary set after token q (the caller combines the stored classes with logsumexp).
        gamma: merging threshold; a chunk ends a group iff `exp(boundary log-mass at its last token) > gamma`.
        drop_unterminated_groups: drop a group that ends on a text chunk whose boundary probability is ≤ gamma
            (see the module docstring).
        debias: add the boundary log-mass at the group's last token to the group log-prob (append_space, §5.2;
            the paper's Table 8 ablation turns it off). Merging and dropping still follow `gamma` either way.

    Returns:
        `AlmTargets`.

    Raises:
        AlignmentError: the chunks reach past the teacher arrays, or a log-prob inside a chunk is NaN.
    """
    body = np.array(teacher_logp, dtype=np.float64)  # [n], a copy: position 0 is zeroed below
    n = len(body)
    boundary_logmass = np.asarray(teacher_boundary_logmass)
    if boundary_logmass.shape != (n,):
        raise AlignmentError(
            f"teacher_boundary_logmass has shape {boundary_logmass.shape}, expected ({n},) like teacher_logp; "
            "combine the stored [n, 5] classes into one column with logsumexp first."
        )
    if len(chunks) and int(chunks.teacher_end.max()) > n:
        raise AlignmentError(
            f"chunks reach teacher position {int(chunks.teacher_end.max())} but the teacher has {n} tokens; "
            "align against the same teacher tokens whose log-probs you pass."
        )
    # prefix[q] = Σ_{1 <= r < q} logp[r]; position 0 contributes nothing (§5.1).
    if n:
        body[0] = 0.0
    prefix = np.zeros(n + 1)
    np.cumsum(body, out=prefix[1:])

    in_loss = chunks.in_loss
    every_chunk = bool(in_loss.all())  # plain text trained throughout: nothing to select
    teacher_start = chunks.teacher_start if every_chunk else chunks.teacher_start[in_loss]
    teacher_end = chunks.teacher_end if every_chunk else chunks.teacher_end[in_loss]
    student_start = chunks.student_start if every_chunk else chunks.student_start[in_loss]
    student_end = chunks.student_end if every_chunk else chunks.student_end[in_loss]
    chunk_is_block = chunks.is_block if every_chunk else chunks.is_block[in_loss]
    num_loss_chunks = len(teacher_start)
    chunk_logp = np.minimum(
        prefix[teacher_end] - prefix[teacher_start], 0.0
    )  # [C'] clipped per chunk (§5.1)
    if np.isnan(chunk_logp).any():
        bad = int(np.flatnonzero(np.isnan(chunk_logp))[0])
        raise AlignmentError(
            f"teacher log-prob is NaN inside chunk {bad} (teacher positions {teacher_start[bad]}..{teacher_end[bad]}); "
            "only position 0 of a sequence may be NaN. Check the teacher store."
        )
    # [C'] the boundary log-mass (clipped to <= 0) at each chunk's last token
    chunk_boundary = (
        np.minimum(boundary_logmass[teacher_end - 1].astype(np.float64), 0.0)
        if num_loss_chunks
        else np.zeros(0)
    )
    is_boundary = np.exp(chunk_boundary) > gamma  # strict (§5.3)

    ends_group = is_boundary.copy()
    if num_loss_chunks:
        adjacent = (teacher_start[1:] == teacher_end[:-1]) & (student_start[1:] == student_end[:-1])
        ends_group[:-1] |= ~adjacent
        ends_group[-1] = True
    group_last = np.flatnonzero(ends_group)
    group_first = np.zeros(len(group_last), _INT)
    group_first[1:] = group_last[:-1] + 1
    # [G] no append_space after a block, and none at all without debiasing
    last_is_block = chunk_is_block[group_last]
    has_boundary_term = ~last_is_block & debias
    group_logp = (
        np.add.reduceat(chunk_logp, group_first) if len(group_last) else np.zeros(0)
    ) + np.where(has_boundary_term, chunk_boundary[group_last], 0.0)
    if drop_unterminated_groups:
        keep = is_boundary[group_last] | last_is_block
        group_first, group_last, group_logp = group_first[keep], group_last[keep], group_logp[keep]
        has_boundary_term = has_boundary_term[keep]

    return AlmTargets(
        teacher_group_logp=group_logp.astype(np.float32),
        teacher_group_start=teacher_start[group_first],
        teacher_group_end=teacher_end[group_last],
        student_group_start=student_start[group_first],
        student_group_end=student_end[group_last],
        teacher_group_last_pos=teacher_end[group_last] - 1,
        student_group_last_pos=student_end[group_last] - 1,
        teacher_chunk_last_pos=chunks.teacher_end - 1,
        student_chunk_last_pos=chunks.student_end - 1,
        group_has_boundary_term=has_boundary_term,
    )


def combine_boundary_classes(
    boundary_logmass: np.ndarray, classes: tuple[int, ...] = DEFAULT_BOUNDARY_CLASSES
) -> np.ndarray:
    """Log-mass of a union of the stored first-byte classes: logsumexp over `classes` of [n, 5] → float64 [n].

    The default is `alm.boundary.DEFAULT_BOUNDARY_CLASSES`, tokenkit's `space+tab+newline+special` (§5.2), the
    same set `alm train` uses by default.
    """
    stored = np.asarray(boundary_logmass)[:, list(classes)].astype(np.float64)  # [n, c]
    top = stored.max(axis=1)  # [n]
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.exp(stored - top[:, None]).sum(axis=1)  # [n]: >= 1, or 0 where every class is -inf
    if len(total) and total.min() > 0:
        log_total = np.log(total)
    else:
        with np.errstate(divide="ignore"):
            log_total = np.log(total)
    return np.minimum(top + log_total, 0.0)


def chunk_logp_sums(logp: np.ndarray, start_pos: np.ndarray, end_pos: np.ndarray) -> np.ndarray:
    """float32 [C]: sums of per-token log-probs over `[start_pos, end_pos)` (positions >= 1), by prefix sums."""
    values = np.nan_to_num(np.asarray(logp, dtype=np.float64), nan=0.0)
    values[0] = 0.0
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return (prefix[end_pos] - prefix[start_pos]).astype(np.float32)
