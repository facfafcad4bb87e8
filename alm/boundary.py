"""The boundary classes: the one definition of the first-byte classes a store records and of the default set ALM
debiases and merges with (ALM_SPEC.md §5.2-§5.3).

A token's class is 4 (`special`) if it is a special token, else decided by its first byte: 0 space (0x20),
1 newline (0x0A), 2 tab (0x09), 3 other whitespace (0x0B-0x0D); any other token is in no class (-1). Stores keep the
teacher's next-token log-mass per class ([n, 5], in this order); training combines a chosen set of classes with
logsumexp. The default set is tokenkit's `space+tab+newline+special` (`get_space_mask`), also the recipe default
of `loss.boundary_classes`.

The bottom layer: imports nothing from `alm`; `alm.vocab`, `alm.store`, `alm.teacher`, `alm.align` and
`alm.config` import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

BoundaryClass = Literal["space", "newline", "tab", "other_whitespace", "special"]
# In the store's column order.
BOUNDARY_CLASS_NAMES: tuple[str, ...] = get_args(BoundaryClass)
BOUNDARY_CLASS_FIRST_BYTES: tuple[tuple[int, ...], ...] = (
    (0x20,),
    (0x0A,),
    (0x09,),
    (0x0B, 0x0C, 0x0D),
    (),
)
NUM_BOUNDARY_CLASSES = len(BOUNDARY_CLASS_NAMES)
SPECIAL_CLASS = BOUNDARY_CLASS_NAMES.index("special")
DEFAULT_BOUNDARY_CLASS_NAMES: tuple[BoundaryClass, ...] = ("space", "newline", "tab", "special")

_FIRST_BYTE_CLASS = {
    byte: index for index, first in enumerate(BOUNDARY_CLASS_FIRST_BYTES) for byte in first
}


def boundary_class_ids(names: Iterable[str]) -> tuple[int, ...]:
    """Store column indices of the named classes, ascending."""
    return tuple(sorted(BOUNDARY_CLASS_NAMES.index(name) for name in names))


DEFAULT_BOUNDARY_CLASSES: tuple[int, ...] = boundary_class_ids(DEFAULT_BOUNDARY_CLASS_NAMES)


def boundary_class_of(token_bytes: bytes, is_special: bool) -> int:
    """Class of one token: `SPECIAL_CLASS` if special, else by its first byte, else -1 (also for no bytes)."""
    if is_special:
        return SPECIAL_CLASS
    if not token_bytes:
        return -1
    return _FIRST_BYTE_CLASS.get(token_bytes[0], -1)
