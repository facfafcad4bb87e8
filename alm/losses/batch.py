"""Collation of per-example ALM targets into padded batch tensors (ALM_SPEC.md §6.4, data side).

Owns `pad_targets`, called by the training DataLoader's collate function. Must not import `alm.config`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from alm.align.targets import AlmTargets

_GROUP_FIELDS = (
    "student_group_start",
    "student_group_end",
    "student_group_last_pos",
    "teacher_group_start",
    "teacher_group_end",
    "teacher_group_last_pos",
)
_CHUNK_FIELDS = ("teacher_chunk_last_pos", "student_chunk_last_pos")


def _pad(arrays: list[np.ndarray], width: int, fill: float, dtype: npt.DTypeLike) -> torch.Tensor:
    out = np.full((len(arrays), width), fill, dtype=dtype)
    for row, values in enumerate(arrays):
        out[row, : len(values)] = values
    return torch.from_numpy(out)


def pad_targets(examples: Sequence[AlmTargets]) -> dict[str, torch.Tensor]:
    """Stack per-example `AlmTargets` into padded CPU tensors.

    Args:
        examples: one `AlmTargets` per example of the micro-batch (from `alm.align.build_alm_targets`).

    Returns:
        A dict (G = most groups in the batch, C = most greedy chunks, both at least 1):

        - `teacher_group_logp` float32 [B, G] (0 where padded);
        - `student_group_start`, `student_group_end`, `student_group_last_pos`, `teacher_group_start`,
          `teacher_group_end`, `teacher_group_last_pos` int64 [B, G] (-1 where padded);
        - `group_mask` bool [B, G]; `group_has_boundary_term` bool [B, G] (False where padded);
        - `teacher_chunk_last_pos`, `student_chunk_last_pos` int64 [B, C] (-1 where padded), `chunk_mask` bool
          [B, C] (hidden-state loss positions, §7.1);
        - `num_groups`, `num_chunks` int64 scalars (this micro-batch's counts, to sum into the global normaliser).
    """
    num_groups = [example.num_groups for example in examples]
    num_chunks = [example.num_chunks for example in examples]
    group_width = max([1, *num_groups])
    chunk_width = max([1, *num_chunks])
    batch: dict[str, torch.Tensor] = {
        "teacher_group_logp": _pad(
            [e.teacher_group_logp for e in examples], group_width, 0.0, np.float32
        ),
    }
    for field in _GROUP_FIELDS:
        batch[field] = _pad([getattr(e, field) for e in examples], group_width, -1, np.int64)
    batch["group_has_boundary_term"] = _pad(
        [e.group_has_boundary_term for e in examples], group_width, False, np.bool_
    )
    batch["group_mask"] = (
        torch.arange(group_width)[None, :] < torch.tensor(num_groups, dtype=torch.int64)[:, None]
    )
    for field in _CHUNK_FIELDS:
        batch[field] = _pad([getattr(e, field) for e in examples], chunk_width, -1, np.int64)
    batch["chunk_mask"] = (
        torch.arange(chunk_width)[None, :] < torch.tensor(num_chunks, dtype=torch.int64)[:, None]
    )
    batch["num_groups"] = torch.tensor(sum(num_groups), dtype=torch.int64)
    batch["num_chunks"] = torch.tensor(sum(num_chunks), dtype=torch.int64)
    return batch
