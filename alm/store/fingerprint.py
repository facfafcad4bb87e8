"""sha256 fingerprints and checksums of arrays, files and JSON values (`DESIGN.md`, the store manifest).

Owns the hashing conventions of the store: an array's checksum is the sha256 of its raw C-order little-endian
bytes (so a reader with only numpy can check it); a JSON value's fingerprint is the sha256 of its canonical form
(sorted keys, no whitespace). The teacher-tokenizer fingerprint itself is `Vocab.fingerprint()` (`alm.vocab`).
Imports hashlib, json and numpy only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def canonical_json(value: Any) -> bytes:
    """The canonical JSON bytes of a value: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def json_fingerprint(value: Any) -> str:
    """sha256 hex of `canonical_json(value)`."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def bytes_fingerprint(data: bytes) -> str:
    """sha256 hex of raw bytes (a file's content)."""
    return hashlib.sha256(data).hexdigest()


def array_bytes(array: np.ndarray) -> memoryview:
    """The raw C-order little-endian bytes of an array (no copy when it already is)."""
    arr = np.asarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


class ArrayHasher:
    """Incremental sha256 over the rows of an array written in pieces along its first axis."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, rows: np.ndarray) -> None:
        self._hash.update(array_bytes(rows))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def array_checksum(array: np.ndarray) -> str:
    """sha256 hex of an array's raw C-order little-endian bytes (shape and dtype are recorded separately)."""
    return hashlib.sha256(array_bytes(array)).hexdigest()
