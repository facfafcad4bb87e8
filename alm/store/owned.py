"""Which files of a store alm wrote: what `--overwrite` may delete (`DESIGN.md` "Stores never lie", issue 9).

`written_store_files(location, prefix)` lists, by "/"-separated path relative to `prefix` (a store root, or the
`.alm-replaced-*` folder an old store was moved into), the files an alm store consists of: its JSON documents
(plan, manifest, listing of a pushed copy), the store card, every file its manifest and its shards' `shard.json`
inventories list, the vocabulary and saved tokenizer, alignment caches, temp shard folders, claims, and alm's temp
and stale copies of any of these. Anything else (a user's notes in `shards/`) is not alm's and is never deleted.
Works on local folders and fsspec object stores alike (`alm.store._fs.Location`). Imports the store's schema,
manifest and file access only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from alm.errors import StoreError
from alm.store import schema
from alm.store._fs import Location
from alm.store.card import CARD_FILE
from alm.store.manifest import StoreManifest

FILES_FILE = "alm-store.files.json"  # the listing of a pushed or pulled copy (alm.store.transfer)
_TEMP_SUFFIX = re.compile(r"\.(tmp|stale)-[0-9a-f]{8}$")


def files_under(location: Location, prefix: str) -> list[str]:
    """Every file under `prefix` (not following symlinked folders), by "/"-separated path relative to it, sorted."""
    root = location.path(prefix)
    if location.is_local:
        out = []
        for dirpath, dirnames, names in os.walk(root):
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for name in [*names, *links]:
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
        return sorted(out)
    if not location.fs.exists(root):
        return []
    return sorted(p[len(root) :].lstrip("/") for p in location.fs.find(root))


def _json(location: Location, *parts: str) -> dict | None:
    try:
        doc = json.loads(location.read_bytes(*parts))
    except (StoreError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def written_store_files(location: Location, prefix: str = "") -> set[str]:
    """The files of the store at `prefix` that alm wrote (see the module docstring), relative to `prefix`."""
    present = files_under(location, prefix)
    out = {schema.PLAN_FILE, schema.MANIFEST_FILE, schema.VOCAB_TABLE_FILE, CARD_FILE, FILES_FILE}
    manifest = _json(location, prefix, schema.MANIFEST_FILE)
    if manifest is not None:
        # a damaged manifest lists nothing: the other rules below still find alm's files
        with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
            out.update(StoreManifest.from_json(manifest).files)
    tokenizer, alignments = f"{schema.TOKENIZER_DIR}/", "alignments/"
    out.update(rel for rel in present if rel.startswith((tokenizer, alignments)))
    shards = f"{schema.SHARDS_DIR}/"
    for name in sorted(
        {rel[len(shards) :].split("/")[0] for rel in present if rel.startswith(shards)}
    ):
        where = f"{shards}{name}"
        if name.startswith(schema.TEMP_SHARD_DIR_PREFIX):
            out.update(rel for rel in present if rel.startswith(f"{where}/"))
        elif schema.SHARD_DIR_PATTERN.fullmatch(name):
            doc = _json(location, prefix, where, schema.SHARD_FILE)
            files = doc.get("files") if doc is not None else None
            if not isinstance(files, dict | list):  # no inventory: the fixed names of a shard
                arrays = f"{where}/{schema.ARRAYS_DIR}/"
                files = [schema.INDEX_FILE, schema.INDEX_FILE_V2] + [
                    rel[len(where) + 1 :] for rel in present if rel.startswith(arrays)
                ]
            out.update(f"{where}/{rel}" for rel in [schema.SHARD_FILE, *files])
        elif schema.CLAIM_FILE_PATTERN.fullmatch(name):
            out.add(where)
    # temp and stale copies of alm's files (a write killed before its rename)
    out.update(
        rel for rel in present if _TEMP_SUFFIX.search(rel) and _TEMP_SUFFIX.sub("", rel) in out
    )
    return out
