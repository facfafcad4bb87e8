"""Finalizing a teacher store: check every shard, then write the manifest last and atomically (`DESIGN.md`).

Owns `alm store finalize` and the last worker's `try_finalize`. A store is finished exactly when
`alm-store.json` exists; it is written only after every expected shard 0..N-1 is present exactly once, its counts
and checksums match its `shard.json`, and its fingerprints match the plan. Imports numpy, pyarrow and zarr only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from alm.errors import StoreError
from alm.store import integrity, schema
from alm.store._fs import Location, locate
from alm.store.card import CARD_FILE, render_card
from alm.store.fingerprint import array_checksum
from alm.store.manifest import StoreManifest
from alm.store.owned import written_store_files
from alm.store.reader import ShardCheck, read_manifest, read_shard_arrays, read_shard_index
from alm.store.replace import remove_replaced, remove_replaced_remote
from alm.store.writer import StoreLayout, StorePlan, read_plan, utc_now

logger = logging.getLogger(__name__)


def _check_shard(
    location: Location, name: str, doc: dict[str, Any], plan: StorePlan, verify_arrays: bool
) -> list[str]:
    """Problems of one committed shard folder (empty list when it is sound)."""
    where = f"{schema.SHARDS_DIR}/{name}"
    problems = []
    doc_problem = integrity.document_problem(doc)
    if doc_problem:
        return [f"{where}/{schema.SHARD_FILE} {doc_problem}"]
    expected = {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "num_shards": plan.num_shards,
        "plan_fingerprint": plan.fingerprint(),
        "tokenizer_fingerprint": plan.tokenizer_fingerprint,
        "data_spec_fingerprint": plan.data_spec_fingerprint,
    }
    for key, want in expected.items():
        if doc.get(key) != want:
            problems.append(f"{where}: {key} is {doc.get(key)!r}, the plan says {want!r}")
    if problems:
        return problems
    check = ShardCheck(
        location.url,
        where,
        int(doc["shard_index"]),
        plan.num_shards,
        doc.get("files"),
        doc.get("index", {}).get("sha256"),
    )
    try:
        index = read_shard_index(location, where, check=check)
    except StoreError as err:
        return [getattr(err, "summary", str(err))]
    num_tokens = int(doc["num_tokens"])
    if index.num_rows != doc["num_sequences"]:
        problems.append(
            f"{where}: index has {index.num_rows} rows, {schema.SHARD_FILE} says {doc['num_sequences']}"
        )
    starts = index.column("token_start").to_numpy()
    ends = index.column("token_end").to_numpy()
    lengths = index.column("num_tokens").to_numpy()
    contiguous = np.array_equal(starts, np.concatenate([[0], ends[:-1]])) if len(starts) else True
    if (
        not contiguous
        or not np.array_equal(ends - starts, lengths)
        or int(lengths.sum()) != num_tokens
    ):
        problems.append(f"{where}: index token ranges do not tile the {num_tokens} stored tokens")
    if int(index.column("num_bytes").to_numpy().sum()) != doc["num_text_bytes"]:
        problems.append(f"{where}: index text bytes differ from {schema.SHARD_FILE}")
    specs = plan.field_specs()
    if set(doc["arrays"]) != set(specs):
        problems.append(
            f"{where}: arrays {sorted(doc['arrays'])} differ from the plan's fields {sorted(specs)}"
        )
        return problems
    try:
        arrays = read_shard_arrays(location, where, list(specs), check) if verify_arrays else {}
        if (
            verify_arrays
        ):  # the files no array read touched (the group's zarr.json): sizes and hashes
            for rel in sorted(set(check.files or ()) - check.seen):
                check.read(location, rel)
    except StoreError as err:
        problems.append(getattr(err, "summary", str(err)))
        return problems
    for name, spec in specs.items():
        want_shape = [num_tokens, *spec.trailing_shape]
        if doc["arrays"][name]["shape"] != want_shape or doc["arrays"][name]["dtype"] != spec.dtype:
            problems.append(
                f"{where}/{name}: {schema.SHARD_FILE} records {doc['arrays'][name]}, expected {want_shape}"
            )
        elif verify_arrays:
            arr = arrays[name]
            if list(arr.shape) != want_shape or str(arr.dtype) != spec.dtype:
                problems.append(
                    f"{where}/{name}: stored shape {arr.shape} {arr.dtype}, expected {want_shape} {spec.dtype}"
                )
            elif array_checksum(arr) != doc["arrays"][name]["sha256"]:
                problems.append(
                    f"{where}/{name}: checksum differs from {schema.SHARD_FILE} (corrupt or modified)"
                )
    return problems


def build_manifest(
    location: Location, plan: StorePlan, shard_docs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The manifest document from the plan and the committed shards' `shard.json` documents."""
    specs = plan.field_specs()
    shards = [
        {
            "index": int(d["shard_index"]),
            "path": schema.shard_path(int(d["shard_index"])),
            "num_sequences": d["num_sequences"],
            "num_tokens": d["num_tokens"],
            "num_text_bytes": d["num_text_bytes"],
            "num_disk_bytes": d["num_disk_bytes"],
            "seq_id_min": d["seq_id_min"],
            "seq_id_max": d["seq_id_max"],
            "arrays": d["arrays"],
            "index_sha256": d["index"]["sha256"],
            "checksum": d.get("checksum"),  # of its shard.json, which lists every file of the shard
        }
        for d in sorted(shard_docs, key=lambda d: int(d["shard_index"]))
    ]
    return {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "teacher": {
            "model": plan.teacher_model,
            "revision": plan.teacher_revision,
            "config_hash": plan.teacher_config_hash,
        },
        "tokenizer_fingerprint": plan.tokenizer_fingerprint,
        "data_spec": {"name": plan.data_spec_name, "fingerprint": plan.data_spec_fingerprint},
        "backend": {
            "name": plan.backend,
            "versions": dict(plan.backend_versions),
            "boundary_method": plan.boundary_method,
            "boundary_top_k": plan.boundary_top_k,
        },
        "fields": {name: spec.to_json() for name, spec in specs.items()},
        "boundary_classes": schema.boundary_classes_json(),
        "default_boundary_classes": list(schema.DEFAULT_BOUNDARY_CLASSES),
        "top_k": plan.top_k,
        "max_length": plan.max_length,
        "hidden_size": plan.hidden_size,
        "settings": dict(plan.settings),
        "plan": plan.to_json(),
        "plan_fingerprint": plan.fingerprint(),
        "vocab": {
            "table": schema.VOCAB_TABLE_FILE if location.exists(schema.VOCAB_TABLE_FILE) else None,
            "tokenizer": schema.TOKENIZER_DIR if location.exists(schema.TOKENIZER_DIR) else None,
        },
        "totals": {
            "num_sequences": sum(s["num_sequences"] for s in shards),
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_text_bytes": sum(s["num_text_bytes"] for s in shards),
            "num_disk_bytes": sum(s["num_disk_bytes"] for s in shards),
        },
        "shards": shards,
        "files": store_file_entries(location),
        "created_at": utc_now(),
    }


def store_file_entries(location: Location) -> dict[str, dict[str, Any]]:
    """Inventory (`num_bytes`, `crc32c`) of the store-level files: the plan, the vocabulary table and every
    file of the saved teacher tokenizer."""
    rels = [schema.PLAN_FILE, schema.VOCAB_TABLE_FILE] + [
        f"{schema.TOKENIZER_DIR}/{name}" for name in location.listdir(schema.TOKENIZER_DIR)
    ]
    return {
        rel: integrity.file_entry(location.read_bytes(rel))
        for rel in rels
        if location.exists(rel) and not location.isdir(rel)
    }


def finalize_store(
    path_or_url: str | os.PathLike[str] | StoreLayout, *, verify_arrays: bool = True
) -> str:
    """Check every shard of a store and write its manifest; return the manifest's path or URL.

    Args:
        path_or_url: the store root (or a `StoreLayout`).
        verify_arrays: recompute every array checksum (reads the whole store once).

    Raises:
        StoreError: a shard is missing, committed twice, outside 0..N-1, or its counts, checksums or fingerprints
            do not match; the message lists every problem and what to do.
    """
    location = path_or_url.location if isinstance(path_or_url, StoreLayout) else locate(path_or_url)
    plan = read_plan(location)
    claims: dict[int, list[str]] = {}
    docs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name in location.listdir(schema.SHARDS_DIR):
        if name.startswith(".tmp-"):
            logger.info("ignoring unfinished temp shard folder %s", name)
            continue
        if not location.exists(schema.SHARDS_DIR, name, schema.SHARD_FILE):
            logger.info("ignoring uncommitted shard folder %s (no %s)", name, schema.SHARD_FILE)
            continue
        doc = location.read_json(schema.SHARDS_DIR, name, schema.SHARD_FILE)
        j = int(doc.get("shard_index", -1))
        claims.setdefault(j, []).append(name)
        docs[name] = doc
        if name != schema.shard_dirname(j):
            problems.append(
                f"{schema.SHARDS_DIR}/{name} holds shard {j} but is not named {schema.shard_dirname(j)}"
            )
    missing = [j for j in range(plan.num_shards) if j not in claims]
    if missing:
        problems.append(
            f"missing shard(s) {missing} of {plan.num_shards}; run the precompute for them "
            f"(`alm precompute RECIPE --shard j/{plan.num_shards}`)"
        )
    for j, names in sorted(claims.items()):
        if len(names) > 1:
            problems.append(
                f"shard {j} is present more than once: {names}; keep one and remove the others"
            )
        if not 0 <= j < plan.num_shards:
            problems.append(
                f"{names} hold shard {j}, outside 0..{plan.num_shards - 1} of this store's plan"
            )
    for name, doc in docs.items():
        problems.extend(_check_shard(location, name, doc, plan, verify_arrays))
    if not problems:
        seen: dict[int, str] = {}
        for name in sorted(docs):
            ids = (
                read_shard_index(location, f"{schema.SHARDS_DIR}/{name}", ["seq_id"])
                .column("seq_id")
                .to_pylist()
            )
            dup = [i for i in ids if i in seen]
            if dup:
                problems.append(
                    f"sequence id(s) {dup[:5]} stored in both {seen[dup[0]]} and {name}"
                )
                break
            seen.update(dict.fromkeys(ids, name))
    if problems:
        raise StoreError(
            f"cannot finalize teacher store {location.url}: "
            + "; ".join(problems)
            + ". The manifest was not written; fix the shards (delete a bad shard folder and rerun its precompute) "
            "and run `alm store finalize` again"
        )
    manifest = integrity.with_checksum(build_manifest(location, plan, list(docs.values())))
    location.write_bytes(
        render_card(StoreManifest.from_json(manifest), schema.FORMAT_NAME).encode(), CARD_FILE
    )  # before the manifest: it is last
    location.write_bytes(schema.json_bytes(manifest), schema.MANIFEST_FILE)
    # the replacement is complete: now the store it replaced may go (only the files alm wrote)
    if location.is_local:
        remove_replaced(location.root, lambda aside: written_store_files(locate(str(aside))))
    else:
        remove_replaced_remote(location, written_store_files)
    logger.info(
        "finalized %s: %d shards, %d sequences, %d tokens",
        location.url,
        plan.num_shards,
        manifest["totals"]["num_sequences"],
        manifest["totals"]["num_tokens"],
    )
    return (
        location.path(schema.MANIFEST_FILE)
        if location.is_local
        else f"{location.url}/{schema.MANIFEST_FILE}"
    )


def try_finalize(layout: StoreLayout, *, verify_arrays: bool = True) -> str | None:
    """Finalize if every shard is committed (for the last worker); None while shards are still missing.

    A store that is already finished is left as it is and its manifest path returned.

    Raises:
        StoreError: all shards are present but one does not check out (see `finalize_store`).
    """
    if len(layout.done_shards()) < layout.plan.num_shards:
        return None
    location = layout.location
    try:
        manifest = read_manifest(location)
    except StoreError:  # damaged: written again below
        manifest = None
    if manifest is not None and manifest.plan_fingerprint == layout.plan.fingerprint():
        return (
            location.path(schema.MANIFEST_FILE)
            if location.is_local
            else f"{location.url}/{schema.MANIFEST_FILE}"
        )
    return finalize_store(layout, verify_arrays=verify_arrays)
