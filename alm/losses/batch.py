"""The ALM loss's typed input: `PaddedTargets`, one micro-batch of per-example `AlmTargets` stacked and padded
(ALM_SPEC.md §6.4, data side).

Owns `PaddedTargets` and `pad_targets`. Stage two's collation (`alm.train.batch.collate`) calls `pad_targets`
once per micro-batch; `alm_batch_loss` (and `alm_live_teacher_loss`) call it. Must not import `alm.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from alm.align.targets import AlmTargets


@dataclass(frozen=True)
class PaddedTargets:
    """A micro-batch of ALM targets (G = most groups in the batch, C = most greedy chunks, both at least 1).

    Attributes:
        teacher_group_logp: float32 [B, G], debiased teacher group log-probs (0 where padded).
        teacher_group_start, teacher_group_end, teacher_group_last_pos: int64 [B, G] teacher token positions
            (-1 where padded).
        student_group_start, student_group_end, student_group_last_pos: int64 [B, G] student token positions
            (-1 where padded); the student's boundary log-mass is read at `student_group_last_pos`.
        group_mask: bool [B, G], the valid groups.
        group_has_boundary_term: bool [B, G], whether the group's log-prob includes the boundary log-mass at its
            end on both sides (False after a template block, without debiasing, and where padded).
        teacher_chunk_last_pos, student_chunk_last_pos: int64 [B, C], the last token of each greedy (unmerged)
            chunk on each side (-1 where padded): the hidden-state loss positions (§7.1).
        chunk_mask: bool [B, C], the valid greedy chunks.
        num_groups, num_chunks: int64 scalars, this micro-batch's counts (summed into the global normalisers).
    """

    teacher_group_logp: torch.Tensor
    teacher_group_start: torch.Tensor
    teacher_group_end: torch.Tensor
    teacher_group_last_pos: torch.Tensor
    student_group_start: torch.Tensor
    student_group_end: torch.Tensor
    student_group_last_pos: torch.Tensor
    group_mask: torch.Tensor
    group_has_boundary_term: torch.Tensor
    teacher_chunk_last_pos: torch.Tensor
    student_chunk_last_pos: torch.Tensor
    chunk_mask: torch.Tensor
    num_groups: torch.Tensor
    num_chunks: torch.Tensor

    def to(self, device: torch.device | str) -> PaddedTargets:
        """The same targets on `device`."""
        return PaddedTargets(
            **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )


def _flat_index(lengths: list[int], width: int) -> np.ndarray:
    """int64 [sum of lengths]: where row i's j-th value sits in a flattened [B, width] array (j < lengths[i])."""
    counts = np.asarray(lengths, dtype=np.int64)
    row_start = np.arange(len(lengths), dtype=np.int64) * width
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(
        row_start - (np.cumsum(counts) - counts), counts
    )


def _pad(
    arrays: list[np.ndarray], width: int, fill: float, dtype: npt.DTypeLike, flat: np.ndarray
) -> torch.Tensor:
    """Right-pad 1-D `arrays` into [B, width] with one scatter (`flat`: `_flat_index` of their lengths)."""
    out = np.full((len(arrays), width), fill, dtype=dtype)
    if len(flat):
        out.reshape(-1)[flat] = np.concatenate(arrays)
    return torch.from_numpy(out)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]


def pad_targets(examples: Sequence[AlmTargets]) -> PaddedTargets:
    """Stack per-example `AlmTargets` (from `alm.align.build_alm_targets`) into padded CPU tensors."""
    num_groups = [example.num_groups for example in examples]
    num_chunks = [example.num_chunks for example in examples]
    group_width = max([1, *num_groups])
    chunk_width = max([1, *num_chunks])
    group_flat = _flat_index(num_groups, group_width)
    chunk_flat = _flat_index(num_chunks, chunk_width)

    def groups(field: str) -> torch.Tensor:
        return _pad([getattr(e, field) for e in examples], group_width, -1, np.int64, group_flat)

    def chunks(field: str) -> torch.Tensor:
        return _pad([getattr(e, field) for e in examples], chunk_width, -1, np.int64, chunk_flat)

    return PaddedTargets(
        teacher_group_logp=_pad(
            [e.teacher_group_logp for e in examples], group_width, 0.0, np.float32, group_flat
        ),
        teacher_group_start=groups("teacher_group_start"),
        teacher_group_end=groups("teacher_group_end"),
        teacher_group_last_pos=groups("teacher_group_last_pos"),
        student_group_start=groups("student_group_start"),
        student_group_end=groups("student_group_end"),
        student_group_last_pos=groups("student_group_last_pos"),
        group_mask=_mask(num_groups, group_width),
        group_has_boundary_term=_pad(
            [e.group_has_boundary_term for e in examples], group_width, False, np.bool_, group_flat
        ),
        teacher_chunk_last_pos=chunks("teacher_chunk_last_pos"),
        student_chunk_last_pos=chunks("student_chunk_last_pos"),
        chunk_mask=_mask(num_chunks, chunk_width),
        num_groups=torch.tensor(sum(num_groups), dtype=torch.int64),
        num_chunks=torch.tensor(sum(num_chunks), dtype=torch.int64),
    )
