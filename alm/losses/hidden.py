"""Hidden-state distillation at the ends of greedy chunks (ALM_SPEC.md §7.1, `alm_latents`).

Owns `hidden_state_loss`, `teacher_channel_second_moment` and `make_hidden_projection`. States are compared at the
last token of each greedy (unmerged) chunk, where both models have read exactly the same text; the loss mask is
not applied. The distance is the squared error divided per channel by the teacher's second moment
(`l2_channelwise`), averaged over channels, summed over chunks and divided by the number of valid chunks in the
optimizer step. Must not import `alm.config`.
"""

from __future__ import annotations

import torch
from torch import nn

from alm.errors import AlmError


def make_hidden_projection(student_width: int, teacher_width: int) -> nn.Module | None:
    """The learned projection R^{d_S} → R^{d_T} (linear with bias) when widths differ, else None (identity)."""
    if student_width == teacher_width:
        return None
    return nn.Linear(student_width, teacher_width, bias=True)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d], positions [B, C] (-1 padded) → [B, C, d]."""
    index = positions.clamp(min=0)[:, :, None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def teacher_channel_second_moment(
    teacher_hidden: torch.Tensor, teacher_pos: torch.Tensor, chunk_mask: torch.Tensor
) -> torch.Tensor:
    """Per-channel mean of the squared teacher state over the valid chunk ends: fp32 [d_T].

    Precompute it once over the dataset and pass it to `hidden_state_loss` for a constant normaliser (§13.14);
    without one, the loss uses this batch's value.
    """
    states = _gather(teacher_hidden.float(), teacher_pos)  # [B, C, dT]
    mask = chunk_mask[:, :, None].float()
    return (states.square() * mask).sum((0, 1)) / mask.sum().clamp(min=1)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_pos: torch.Tensor,
    teacher_pos: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    teacher_second_moment: torch.Tensor | None = None,
    projection: nn.Module | None = None,
    num_valid_chunks_global: int | float | torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Channel-normalised squared error between student and teacher final-norm hidden states at chunk ends.

    Args:
        student_hidden: [B, Ts, d_S], the student's final-norm hidden states (LM-head input).
        teacher_hidden: [B, Tt, d_T], the teacher's stored final-norm hidden states (any float dtype).
        student_pos: int64 [B, C], `student_chunk_last_pos` from `pad_targets` (-1 padded).
        teacher_pos: int64 [B, C], `teacher_chunk_last_pos`.
        chunk_mask: bool [B, C].
        teacher_second_moment: fp32 [d_T] normaliser (`teacher_channel_second_moment`); None computes it from
            this batch.
        projection: maps d_S → d_T (required when the widths differ; `make_hidden_projection`).
        num_valid_chunks_global: valid chunks in the optimizer step; None uses this batch's count.
        eps: added to the normaliser.

    Returns:
        fp32 scalar.

    Raises:
        AlmError: widths differ and no projection was given.
    """
    student_states = _gather(student_hidden, student_pos).float()  # [B, C, dS]
    if projection is not None:
        student_states = projection(student_states.to(next(projection.parameters()).dtype)).float()
    teacher_states = _gather(teacher_hidden.float(), teacher_pos)  # [B, C, dT]
    if student_states.shape[-1] != teacher_states.shape[-1]:
        raise AlmError(
            f"student hidden width {student_states.shape[-1]} differs from teacher width {teacher_states.shape[-1]}; "
            "pass projection=make_hidden_projection(student_width, teacher_width) (and train it)."
        )
    if teacher_second_moment is None:
        teacher_second_moment = teacher_channel_second_moment(
            teacher_hidden, teacher_pos, chunk_mask
        )
    normaliser = teacher_second_moment.float().to(teacher_states.device) + eps  # [dT]
    per_chunk = ((student_states - teacher_states).square() / normaliser).mean(-1)  # [B, C]
    num_chunks = chunk_mask.sum()
    denominator = (
        num_chunks.clamp(min=1) if num_valid_chunks_global is None else num_valid_chunks_global
    )
    return torch.where(chunk_mask, per_chunk, 0.0).sum() / denominator
