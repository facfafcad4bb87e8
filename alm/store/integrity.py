"""Store integrity: the file inventories and self-checksums that let every read check what it reads.

Owns the rules behind "stores never lie" (`DESIGN.md`): every JSON document of a store (plan, `shard.json`,
manifest) carries a `checksum` (sha256 of its canonical JSON without that key); every `shard.json` lists each file
of its shard (`files`: relative path -> `num_bytes`, `sha256` of the bytes as written, whatever the codec); the
manifest lists the plan and vocabulary files the same way and each shard's `checksum`. A reader checks sizes and
hashes while it reads whole files, so verification costs one sha256 pass over bytes it reads anyway.

Every mismatch is a `StoreCorruptError` naming the store, the shard, the file, what differs, and what to do.
Stores written before inventories existed (format v1 without `files`) are still checked by their recorded array
and index checksums. Imports hashlib, json and `alm.errors` only (through `fingerprint`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import google_crc32c
import numpy as np

from alm.errors import StoreCorruptError
from alm.store import schema
from alm.store.fingerprint import json_fingerprint

CHECKSUM_KEY = "checksum"


def with_checksum(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with its `checksum` (sha256 of its canonical JSON without the key) added last."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: json_fingerprint(body)}


def document_problem(doc: Mapping[str, Any]) -> str | None:
    """Why a JSON document fails its own checksum, or None (also None for a document written without one)."""
    if CHECKSUM_KEY not in doc:
        return None
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    actual = json_fingerprint(body)
    if actual != doc[CHECKSUM_KEY]:
        return f"its content does not match its recorded checksum ({str(doc[CHECKSUM_KEY])[:12]}..., content hashes to {actual[:12]}...)"
    return None


def crc32c_hex(parts: Iterable[bytes | memoryview]) -> str:
    """CRC-32C of the concatenated parts, as 8 lowercase hex digits (the `crc32c` of an inventory entry)."""
    crc = 0
    for part in parts:
        view = np.frombuffer(
            part, dtype=np.uint8
        )  # a read-only view: google_crc32c takes no memoryview
        view.flags.writeable = False
        crc = google_crc32c.extend(crc, view)  # pyright: ignore[reportAttributeAccessIssue]
    return f"{crc:08x}"


def file_entry(data: bytes | memoryview) -> dict[str, Any]:
    """The inventory entry of one file (format version 3): its size and the CRC-32C of its bytes."""
    return {"num_bytes": len(data), "crc32c": crc32c_hex((data,))}


def local_file_entries(root: str, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Inventory of every file under a local folder, keyed by "/"-separated relative path, sorted."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel in exclude:
                continue
            with open(path, "rb") as fh:
                out[rel] = file_entry(fh.read())
    return dict(sorted(out.items()))


def entry_problem(data: bytes | memoryview, entry: Mapping[str, Any]) -> str | None:
    """Why a file's bytes differ from its inventory entry, or None."""
    if len(data) != int(entry["num_bytes"]):
        return f"has {len(data)} bytes, {int(entry['num_bytes'])} were written (truncated or overwritten)"
    return parts_problem((data,), entry)


def parts_problem(parts: Iterable[bytes | memoryview], entry: Mapping[str, Any]) -> str | None:
    """Why a file read in pieces (sizes already checked) differs from its inventory entry, or None.

    The entry's checksum is `crc32c` (format version 3) or `sha256` (version 2); an entry with neither is a
    damaged inventory.
    """
    if "crc32c" in entry:
        kind, actual = "crc32c", crc32c_hex(parts)
    elif "sha256" in entry:
        hasher = hashlib.sha256()
        for part in parts:
            hasher.update(part)
        kind, actual = "sha256", hasher.hexdigest()
    else:
        return "has no checksum in its inventory entry (the inventory is damaged)"
    if actual != entry[kind]:
        return f"has the right size but different bytes than were written ({kind} differs)"
    return None


def shard_fix(url: str, shard_index: int | None, num_shards: int | None) -> str:
    """What a user does about a damaged shard (or store file when `shard_index` is None)."""
    verify = f"`alm verify {url}` lists every damaged file"
    if shard_index is None:
        return (
            "copy the file back from an intact copy of the store, or recompute the store; "
            f"a damaged alm-store.json alone is rebuilt from the shards by `alm store finalize {url}`. {verify}"
        )
    worker = f"--shard {shard_index % num_shards}/{num_shards}" if num_shards else "--shard i/N"
    return (
        "copy the shard back from an intact copy of the store, or recompute it: remove "
        f"{schema.shard_path(shard_index)}/ and {schema.MANIFEST_FILE}, rerun `alm precompute RECIPE "
        f"{worker}` (same recipe and worker count as before) and `alm store finalize {url}`. {verify}"
    )


def corrupt(
    url: str,
    rel_path: str,
    problem: str,
    *,
    shard_index: int | None = None,
    num_shards: int | None = None,
) -> StoreCorruptError:
    """The one error every damaged read raises: store, shard, file, what differs, what to do."""
    shard = f" shard {shard_index}," if shard_index is not None else ""
    return StoreCorruptError(
        f"teacher store {url} is damaged:{shard} file {rel_path} {problem}. Nothing was trained on it. "
        f"Fix: {shard_fix(url, shard_index, num_shards)}"
    )
