"""Alignment between teacher and student tokenizations, and the teacher-side ALM targets (ALM_SPEC.md §4–§5).

NumPy only: never imports torch or `alm.config`.
"""

from alm.align.chunks import Chunks, align_chunks, align_sequences
from alm.align.targets import AlmTargets, build_alm_targets, combine_boundary_classes

__all__ = [
    "AlmTargets",
    "Chunks",
    "align_chunks",
    "align_sequences",
    "build_alm_targets",
    "combine_boundary_classes",
]
