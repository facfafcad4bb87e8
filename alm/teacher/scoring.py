"""From teacher logits to the store's per-token arrays (ALM_SPEC.md §10.1 T1, T2, T4; §10.2 option 1, exact).

Pure torch functions, no model, no I/O. Everything is computed in fp32 whatever the model's dtype, in **row chunks**
so that only one fp32 [row_chunk, V] buffer exists at a time (the LM head itself can be applied per chunk too, see
`scores_from_hidden`, so the [tokens, V] logits tensor never exists in full).

Conventions (rows are positions of one sequence, or of several sequences laid end to end):

- `logp[q] = log_softmax(logits[q-1])[token_q]`, NaN at each sequence's first position;
- `boundary_logmass[q, c] = logsumexp(logits[q, class c]) - logsumexp(logits[q])` at every position, the last
  included; -inf for an empty class;
- `topk_*[q]`: the k most likely next tokens under `logits[q]` (the distribution predicting token q+1), descending.

Speed: per chunk, one max pass, one in-place exp pass, and one [R, V] x [V, 6] matmul that yields the five class
masses and the total at once. A class mass that underflows fp32 (every member more than ~87 nats below the row
maximum) is recomputed exactly with a masked logsumexp, so the result equals the direct formula at every position.

`LogitTransform` is what a model family does to `lm_head(hidden)` before returning logits (Gemma 2's soft-cap,
Cohere's and Granite's scaling), so the HF backend can apply the head *and* the transform in fp32.

Imports torch and numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from alm.teacher.base import NUM_BOUNDARY_CLASSES, TeacherScores


@dataclass(frozen=True)
class LogitTransform:
    """The elementwise operations a model applies to `lm_head(hidden)` before returning its logits, in this order.

    Attributes:
        multiply: Cohere's `logit_scale` (`logits * logit_scale`), or None.
        divide: Granite's `logits_scaling` (`logits / logits_scaling`), or None.
        softcap: Gemma 2's `final_logit_softcapping` (`cap * tanh(logits / cap)`), or None.
    """

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the transform to `logits` in place, in their dtype, with the same operations in the same order as
        the transformers models (so that in the model's own dtype the result is bit-identical to its logits)."""
        if self.multiply is not None:
            logits.mul_(self.multiply)
        if self.divide is not None:
            logits.div_(self.divide)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def describe(self) -> str:
        """`none`, or e.g. `softcap 30.0`, for logs."""
        parts = [
            f"{name} {value}"
            for name, value in (
                ("x", self.multiply),
                ("/", self.divide),
                ("softcap", self.softcap),
            )
            if value is not None
        ]
        return ", ".join(parts) or "none"


def class_mass_matrix(class_masks: torch.Tensor) -> torch.Tensor:
    """fp32 [V, 6] matrix: columns 0-4 are the class indicators, column 5 is all ones (the total mass).

    Args:
        class_masks: bool [5, V] class membership (padded vocab rows in no class).
    """
    ones = torch.ones(1, class_masks.shape[1], dtype=torch.bool, device=class_masks.device)
    return torch.cat([class_masks, ones], dim=0).to(torch.float32).T.contiguous()


def score_rows(
    rows_of: Callable[[int, int], torch.Tensor],
    num_rows: int,
    token_ids: torch.Tensor,
    seq_start: torch.Tensor,
    mass_matrix: torch.Tensor,
    top_k: int = 0,
    row_chunk: int = 1024,
) -> dict[str, torch.Tensor]:
    """Score `num_rows` positions given a function that produces their logits chunk by chunk.

    Args:
        rows_of: `rows_of(r0, r1)` returns logits [r1 - r0, V] (any float dtype) of positions r0..r1-1, as a tensor
            this function may overwrite (a fresh one, not a view of the caller's logits).
        num_rows: total number of positions N.
        token_ids: int64 [N] the token at each position.
        seq_start: bool [N], True where a sequence starts (its logp is NaN and it is not predicted from the row
            before it).
        mass_matrix: fp32 [V, 6] from `class_mass_matrix`.
        top_k: number of top next-token entries to return (0: none).
        row_chunk: positions per fp32 [row_chunk, V] buffer.

    Returns:
        dict of fp32/int64 tensors on the logits' device: `logp` [N], `boundary_logmass` [N, 5], and with top_k
        `topk_id` [N, k], `topk_logp` [N, k].
    """
    device = mass_matrix.device
    token_ids = token_ids.to(device=device, dtype=torch.long)
    seq_start = seq_start.to(device=device, dtype=torch.bool)
    # next_token[r]: the token that row r predicts, or -1 if row r ends its sequence
    next_token = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    if num_rows > 1:
        next_token[:-1] = torch.where(seq_start[1:], -1, token_ids[1:])
    next_logp = torch.full((num_rows,), float("nan"), dtype=torch.float32, device=device)
    boundary_logmass = torch.empty(
        (num_rows, NUM_BOUNDARY_CLASSES), dtype=torch.float32, device=device
    )
    topk_id = torch.empty((num_rows, top_k), dtype=torch.long, device=device) if top_k else None
    topk_logp = (
        torch.empty((num_rows, top_k), dtype=torch.float32, device=device) if top_k else None
    )
    class_nonempty = mass_matrix[:, :NUM_BOUNDARY_CLASSES].sum(dim=0) > 0  # [5]
    chunk = max(1, int(row_chunk))
    for r0 in range(0, num_rows, chunk):
        r1 = min(num_rows, r0 + chunk)
        x = rows_of(r0, r1).to(torch.float32)  # [R, V], overwritten in place below
        row_max = x.amax(dim=-1)  # [R]
        targets = next_token[r0:r1]
        has_target = targets >= 0
        target_logit = x.gather(1, targets.clamp(min=0)[:, None])[:, 0]  # [R]
        top = torch.topk(x, top_k, dim=-1) if top_k else None  # values, indices [R, k]
        x.sub_(row_max[:, None]).exp_()  # [R, V] probabilities, unnormalised
        mass = x @ mass_matrix  # [R, 6]: five classes, then the total
        del x
        log_total = mass[:, -1].log()  # [R]
        log_norm = row_max + log_total  # logsumexp of the row
        blm = mass[:, :NUM_BOUNDARY_CLASSES].log() - log_total[:, None]  # [R, 5]
        underflow = (mass[:, :NUM_BOUNDARY_CLASSES] == 0) & class_nonempty[None, :]
        if bool(underflow.any()):
            blm = _exact_boundary_rows(rows_of, r0, r1, blm, underflow, mass_matrix, log_norm)
        boundary_logmass[r0:r1] = blm
        next_logp[r0:r1] = torch.where(has_target, target_logit - log_norm, float("nan"))
        if top is not None and topk_id is not None and topk_logp is not None:
            topk_id[r0:r1] = top.indices
            topk_logp[r0:r1] = top.values - log_norm[:, None]
    # logp[q] is what row q-1 predicted; first positions stay NaN
    logp = torch.full((num_rows,), float("nan"), dtype=torch.float32, device=device)
    if num_rows > 1:
        logp[1:] = next_logp[:-1]
    logp[seq_start] = float("nan")
    out = {"logp": logp, "boundary_logmass": boundary_logmass}
    if topk_id is not None and topk_logp is not None:
        out["topk_id"] = topk_id
        out["topk_logp"] = topk_logp
    return out


def _exact_boundary_rows(
    rows_of: Callable[[int, int], torch.Tensor],
    r0: int,
    r1: int,
    blm: torch.Tensor,
    underflow: torch.Tensor,
    mass_matrix: torch.Tensor,
    log_norm: torch.Tensor,
) -> torch.Tensor:
    """Recompute the classes whose summed probability underflowed, with a masked logsumexp (rare)."""
    blm = blm.clone()
    x = rows_of(r0, r1).to(torch.float32)  # [R, V]
    rows, classes = torch.nonzero(underflow, as_tuple=True)
    for row, cls in zip(rows.tolist(), classes.tolist(), strict=True):
        member = mass_matrix[:, cls] > 0
        blm[row, cls] = torch.logsumexp(x[row][member], dim=0) - log_norm[row]
    return blm


def scores_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor | np.ndarray,
    class_masks: torch.Tensor | np.ndarray,
    top_k: int = 0,
    row_chunk: int = 1024,
) -> TeacherScores:
    """Store arrays of one sequence from its logits.

    Args:
        logits: [n, V] logits of one sequence (row q predicts token q+1), any float dtype.
        token_ids: int [n] the sequence's tokens.
        class_masks: bool [5, V] boundary-class membership over the model's rows (see
            `alm.teacher.base.boundary_class_masks`).
        top_k: top-k entries per position (0: none).
        row_chunk: rows per fp32 buffer; does not change the results.

    Returns:
        `TeacherScores` with numpy arrays (logp float32 [n], boundary_logmass float32 [n, 5], top-k if asked).
    """
    n = logits.shape[0]
    device = logits.device
    masks = torch.as_tensor(
        np.asarray(class_masks) if not torch.is_tensor(class_masks) else class_masks
    )
    mass_matrix = class_mass_matrix(masks.to(device))
    ids = torch.as_tensor(np.asarray(token_ids) if not torch.is_tensor(token_ids) else token_ids)
    seq_start = torch.zeros(n, dtype=torch.bool)
    seq_start[:1] = True

    def rows_of(r0: int, r1: int) -> torch.Tensor:
        return logits[r0:r1].to(torch.float32, copy=True)

    out = score_rows(rows_of, n, ids, seq_start, mass_matrix, top_k, row_chunk)
    return to_teacher_scores(out, [n])[0]


def scores_from_hidden(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    seq_lengths: list[int],
    mass_matrix: torch.Tensor,
    top_k: int = 0,
    row_chunk: int = 1024,
    keep_hidden: bool = False,
) -> list[TeacherScores]:
    """Store arrays of several sequences laid end to end, applying the LM head chunk by chunk.

    Args:
        hidden: [N, d] final-norm hidden states of all positions of all sequences, concatenated.
        lm_head: maps [R, d] hidden states to [R, V] logits (the model's output layer, plus any logit scaling).
        token_ids: int [N] the tokens, concatenated like `hidden`.
        seq_lengths: length of each sequence (sums to N).
        mass_matrix: fp32 [V, 6] from `class_mass_matrix`, on `hidden`'s device.
        top_k: top-k entries per position (0: none).
        row_chunk: rows per LM-head call and fp32 buffer; does not change the results.
        keep_hidden: also return `hidden` (as float32) per sequence.

    Returns:
        One `TeacherScores` per sequence, in order.
    """
    num_rows = hidden.shape[0]
    starts = np.cumsum([0, *seq_lengths[:-1]])
    seq_start = torch.zeros(num_rows, dtype=torch.bool)
    seq_start[torch.as_tensor(starts, dtype=torch.long)] = True
    out = score_rows(
        lambda r0, r1: lm_head(hidden[r0:r1]),
        num_rows,
        token_ids,
        seq_start,
        mass_matrix,
        top_k,
        row_chunk,
    )
    if keep_hidden:
        out["hidden"] = hidden.to(torch.float32)
    return to_teacher_scores(out, seq_lengths)


def to_teacher_scores(out: dict[str, torch.Tensor], seq_lengths: list[int]) -> list[TeacherScores]:
    """Split concatenated score tensors into one numpy `TeacherScores` per sequence."""
    arrays = {key: value.detach().cpu() for key, value in out.items()}
    logp = arrays["logp"].numpy().astype(np.float32, copy=False)
    blm = arrays["boundary_logmass"].numpy().astype(np.float32, copy=False)
    topk_id = arrays["topk_id"].numpy().astype(np.int32) if "topk_id" in arrays else None
    topk_logp = (
        arrays["topk_logp"].numpy().astype(np.float32, copy=False)
        if "topk_logp" in arrays
        else None
    )
    hidden = arrays["hidden"].numpy() if "hidden" in arrays else None
    result = []
    start = 0
    for n in seq_lengths:
        end = start + n
        result.append(
            TeacherScores(
                logp=logp[start:end].copy(),
                boundary_logmass=blm[start:end].copy(),
                topk_id=None if topk_id is None else topk_id[start:end].copy(),
                topk_logp=None if topk_logp is None else topk_logp[start:end].copy(),
                hidden=None if hidden is None else hidden[start:end].copy(),
            )
        )
        start = end
    return result
