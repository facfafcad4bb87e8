"""The teacher store: Zarr v3 per-token arrays + Arrow index + JSON manifest (`docs/store.md`, `DESIGN.md`).

Public: `open_store`, `TeacherStore`, `StoredSequence`, `ShardData` (reader); `StoreManifest` (the typed manifest); `StorePlan`, `prepare_store`,
`StoreLayout`, `ShardWriter` (writer); `finalize_store`, `try_finalize`; `inspect_store`, `compare_stores`;
`push_store`, `pull_store` (transfer).
Imports numpy, pyarrow, zarr and fsspec only (never torch, never `alm.config`); submodules load lazily.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "open_store": "alm.store.reader",
    "TeacherStore": "alm.store.reader",
    "StoredSequence": "alm.store.reader",
    "ShardData": "alm.store.reader",
    "StoreManifest": "alm.store.manifest",
    "StorePlan": "alm.store.writer",
    "StoreLayout": "alm.store.writer",
    "prepare_store": "alm.store.writer",
    "ShardWriter": "alm.store.writer",
    "finalize_store": "alm.store.finalize",
    "try_finalize": "alm.store.finalize",
    "inspect_store": "alm.store.inspect",
    "compare_stores": "alm.store.inspect",
    "compare_stores_stats": "alm.store.inspect",
    "push_store": "alm.store.transfer",
    "pull_store": "alm.store.transfer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alm.store' has no attribute {name!r}")


__all__ = list(_EXPORTS)
