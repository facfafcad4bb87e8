"""Alignment caches: a teacher store aligned against one student tokenizer, stored beside the store's shards.

Owns the on-disk format of `STORE/alignments/<key>/` (docs/store.md, "Alignment caches"): per stored sequence the
student token ids and SFT mask, the greedy chunks (ALM_SPEC §4.1) and the γ-merged groups with their debiased
teacher log-probs and boundary terms (§5.1-§5.3), one Arrow IPC file per store shard. What the cache was built
with (student tokenizer, template family, max length, γ, boundary set, debiasing, the store's plan) is an opaque
`settings` mapping given by the caller (`alm.train.alignments` computes it); this module fingerprints it, checks
it on reuse and refuses a cache built with other settings.

Stores never lie here either: every JSON document ends with its own `checksum` (`alm.store.integrity`), each
shard's JSON lists its Arrow file's size and CRC-32C (`integrity.file_entry`) and the `checksum` of the store shard it was aligned from,
and the cache manifest (written last) lists each shard JSON's checksum. Every read checks what it reads; a
damaged file is a `StoreCorruptError` naming it. Writing is resumable: a shard is done when its JSON (written
after its Arrow file) checks out against the file; a rerun skips done shards and writes the rest.

Pure of training code: imports numpy, pyarrow and `alm.store`; never torch, never `alm.config`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from alm.errors import StoreCorruptError, StoreError, StoreMismatchError
from alm.store import integrity, schema
from alm.store._fs import Location
from alm.store.fingerprint import canonical_json, json_fingerprint
from alm.store.reader import TeacherStore

ALIGNMENTS_DIR = "alignments"
FORMAT_NAME = "alm-alignment-cache"
FORMAT_VERSION = 1
PLAN_FILE = "alm-alignments.plan.json"
MANIFEST_FILE = "alm-alignments.json"
SHARDS_DIR = "shards"
KEY_LENGTH = 16  # hex characters of the student tokenizer fingerprint that name the cache folder
_KEY_RE = re.compile(r"[0-9a-f]{16}")


def cache_key(student_tokenizer_fingerprint: str) -> str:
    """The folder name of a student tokenizer's cache: the first 16 hex digits of its fingerprint."""
    return student_tokenizer_fingerprint[:KEY_LENGTH]


def cache_dir(key: str) -> str:
    """`alignments/<key>`, relative to the store root."""
    return f"{ALIGNMENTS_DIR}/{key}"


def shard_arrow_file(shard_index: int) -> str:
    return f"{SHARDS_DIR}/{schema.shard_dirname(shard_index)}.arrow"


def shard_doc_file(shard_index: int) -> str:
    return f"{SHARDS_DIR}/{schema.shard_dirname(shard_index)}.json"


@dataclass(frozen=True)
class AlignedSequence:
    """One stored sequence aligned against the student (C = greedy chunks, G = groups, Ts = student tokens).

    Token positions are relative to the sequence (teacher positions index the store's arrays), byte offsets are
    into the stored `text`; ranges are `[start, end)`.

    Attributes:
        seq_id: the store's sequence id.
        student_token_id: int32 [Ts], the student's tokens (rendered with its template family, truncated).
        student_sft_mask: bool [Ts], the tokens SFT trains on.
        chunk_teacher_start, chunk_teacher_end, chunk_student_start, chunk_student_end: int32 [C], every
            aligned greedy chunk, in the loss region or not (`chunk_in_loss`).
        chunk_start_byte, chunk_end_byte: int32 [C], the chunk's bytes (equal for a template-block chunk).
        chunk_is_block: bool [C]; chunk_in_loss: bool [C].
        group_teacher_start, group_teacher_end, group_student_start, group_student_end: int32 [G], the γ-merged
            groups the ALM loss compares.
        group_teacher_logp: float32 [G], the debiased teacher log-prob of each group (the loss target).
        group_boundary_logmass: float32 [G], the teacher boundary log-mass after the group's last token.
        group_has_boundary_term: bool [G], whether that boundary log-mass is part of `group_teacher_logp`.
    """

    seq_id: int
    student_token_id: np.ndarray
    student_sft_mask: np.ndarray
    chunk_teacher_start: np.ndarray
    chunk_teacher_end: np.ndarray
    chunk_student_start: np.ndarray
    chunk_student_end: np.ndarray
    chunk_start_byte: np.ndarray
    chunk_end_byte: np.ndarray
    chunk_is_block: np.ndarray
    chunk_in_loss: np.ndarray
    group_teacher_start: np.ndarray
    group_teacher_end: np.ndarray
    group_student_start: np.ndarray
    group_student_end: np.ndarray
    group_teacher_logp: np.ndarray
    group_boundary_logmass: np.ndarray
    group_has_boundary_term: np.ndarray

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_teacher_start)

    @property
    def num_groups(self) -> int:
        return len(self.group_teacher_start)


# Column name -> element dtype of its list column; the prefix says which length it shares.
LIST_COLUMNS: dict[str, np.dtype] = {
    f.name: np.dtype(dtype)
    for f, dtype in zip(
        [f for f in fields(AlignedSequence) if f.name != "seq_id"],
        ["int32", "bool"]
        + ["int32"] * 6
        + ["bool"] * 2
        + ["int32"] * 4
        + ["float32"] * 2
        + ["bool"],
        strict=True,
    )
}
_LENGTH_OF = {
    "student": "student_token_id",
    "chunk": "chunk_teacher_start",
    "group": "group_teacher_start",
}


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    return pa.from_numpy_dtype(dtype)


SCHEMA = pa.schema(
    [pa.field("seq_id", pa.int64())]
    + [pa.field(name, pa.list_(_arrow_type(dtype))) for name, dtype in LIST_COLUMNS.items()]
)


def records_to_arrow(records: Sequence[AlignedSequence]) -> bytes:
    """An Arrow IPC file (Zstd-compressed buffers) with one row per record, in order."""
    columns: list[pa.Array] = [pa.array([r.seq_id for r in records], type=pa.int64())]
    for name, dtype in LIST_COLUMNS.items():
        values = [np.asarray(getattr(r, name), dtype=dtype) for r in records]
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum([len(v) for v in values], out=offsets[1:])
        flat = np.concatenate(values) if values else np.zeros(0, dtype)
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
    table = pa.Table.from_arrays(columns, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=9))
    with pa.ipc.new_file(sink, SCHEMA, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class CacheShard:
    """One cache shard read back, columnar: `record(i)` gives row i as an `AlignedSequence` of array views."""

    def __init__(self, table: pa.Table) -> None:
        self.num_rows = table.num_rows
        self.seq_id = table.column("seq_id").to_numpy()
        self._columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, dtype in LIST_COLUMNS.items():
            column = table.column(name).combine_chunks()
            offsets = column.offsets.to_numpy().astype(np.int64)
            values = column.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            self._columns[name] = (offsets, values)

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The list column `name` as (int64 offsets [rows + 1], flat values)."""
        return self._columns[name]

    def record(self, row: int) -> AlignedSequence:
        values = {}
        for name, (offsets, flat) in self._columns.items():
            values[name] = flat[offsets[row] : offsets[row + 1]]
        return AlignedSequence(seq_id=int(self.seq_id[row]), **values)

    def records(self) -> Iterable[AlignedSequence]:
        return (self.record(i) for i in range(self.num_rows))


def _parse_arrow(data: bytes) -> pa.Table:
    table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    if not table.schema.equals(SCHEMA):
        raise ValueError(f"its columns are {table.schema.names}, expected {SCHEMA.names}")
    return table


def store_facts(store: TeacherStore) -> dict[str, Any]:
    """The store's identity that a cache depends on: its plan and teacher tokenizer fingerprints."""
    manifest = store.manifest
    return {
        "store_plan_fingerprint": manifest.plan_fingerprint,
        "teacher_tokenizer_fingerprint": manifest.tokenizer_fingerprint,
    }


def full_settings(store: TeacherStore, settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` plus the cache format and the store's identity: what the settings fingerprint covers."""
    return {"format_version": FORMAT_VERSION, **dict(settings), **store_facts(store)}


def settings_fingerprint(store: TeacherStore, settings: Mapping[str, Any]) -> str:
    return json_fingerprint(full_settings(store, settings))


def _store_shard_checksum(store: TeacherStore, shard_index: int) -> str | None:
    entry = store.manifest.shard(shard_index)
    return entry.checksum or entry.index_sha256


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _corrupt(cache: CacheLocation, rel: str, problem: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"alignment cache {cache.location.url}/{cache.rel} is damaged: file {rel} {problem}. Training never reads "
        f"it in this state. Fix: rebuild it with `alm align {cache.location.url} --student TOKENIZER --overwrite` "
        f"(or delete {cache.rel}/: training then aligns on the fly)"
    )


@dataclass(frozen=True)
class CacheLocation:
    """Where one cache lives: the store's location and `alignments/<key>`."""

    location: Location
    key: str

    @property
    def rel(self) -> str:
        return cache_dir(self.key)

    def path(self, rel: str) -> str:
        return f"{self.rel}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.location.exists(self.path(rel))

    def read(self, rel: str) -> bytes:
        return self.location.read_bytes(self.path(rel))

    def read_doc(self, rel: str) -> dict[str, Any]:
        """A JSON document of the cache, checked against its own checksum."""
        try:
            doc = self.location.read_json(self.path(rel))
        except StoreError as err:
            raise _corrupt(self, rel, f"cannot be read ({err})") from None
        problem = integrity.document_problem(doc) if isinstance(doc, dict) else "is not an object"
        if problem is None and not (isinstance(doc, dict) and integrity.CHECKSUM_KEY in doc):
            problem = "has no checksum"
        if problem:
            raise _corrupt(self, rel, problem)
        return doc

    def write_doc(self, doc: dict[str, Any], rel: str) -> dict[str, Any]:
        checked = integrity.with_checksum(doc)
        self.location.write_bytes(canonical_json(checked), self.path(rel))
        return checked


def list_cache_keys(store: TeacherStore) -> list[str]:
    """The cache folders under the store's `alignments/` (finished or not)."""
    return [k for k in store.location.listdir(ALIGNMENTS_DIR) if _KEY_RE.fullmatch(k)]


# --------------------------------------------------------------------------------------------------------------
# Writing


def prepare_cache(
    store: TeacherStore, key: str, settings: Mapping[str, Any], *, overwrite: bool = False
) -> CacheLocation:
    """Create (or reopen, to resume) the cache `alignments/<key>/` of a finished store for `settings`.

    Raises:
        StoreError: the store is unfinished.
        StoreMismatchError: the folder holds a cache built with other settings (and not `overwrite`).
    """
    if not store.is_finished:
        raise StoreError(
            f"teacher store {store.url} is unfinished (no manifest); run `alm store finalize {store.url}` "
            "before aligning it"
        )
    cache = CacheLocation(store.location, key)
    wanted = settings_fingerprint(store, settings)
    if cache.exists(PLAN_FILE):
        try:
            old = cache.read_doc(PLAN_FILE)
            old_fingerprint = old.get("settings_fingerprint")
        except StoreCorruptError:
            old, old_fingerprint = {}, None
        if old_fingerprint == wanted:
            return cache
        if not overwrite:
            raise StoreMismatchError(
                f"{store.url}/{cache.rel} holds an alignment cache built with other settings "
                f"({_settings_difference(old.get('settings', {}), full_settings(store, settings))}); "
                "rerun with --overwrite to replace it"
            )
        remove_cache(cache)
    cache.write_doc(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "key": key,
            "settings": full_settings(store, settings),
            "settings_fingerprint": wanted,
            "created_at": _now(),
        },
        PLAN_FILE,
    )
    return cache


def _settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "unreadable plan"
    return "; ".join(f"{k}: cached {old.get(k)!r}, wanted {new.get(k)!r}" for k in keys[:4])


def remove_cache(cache: CacheLocation) -> None:
    """Remove the files alm writes in a cache folder (plan, manifest, shard files and temp files) only."""
    location = cache.location
    for name in location.listdir(cache.path(SHARDS_DIR)):
        if re.fullmatch(r"shard-\d{5}\.(arrow|json)(\.tmp-[0-9a-f]{8})?", name):
            location.remove(cache.path(f"{SHARDS_DIR}/{name}"))
    for name in location.listdir(cache.rel):
        if re.fullmatch(
            rf"({re.escape(PLAN_FILE)}|{re.escape(MANIFEST_FILE)})(\.tmp-[0-9a-f]{{8}})?", name
        ):
            location.remove(cache.path(name))
    for folder in (cache.path(SHARDS_DIR), cache.rel):
        if location.is_local and location.isdir(folder) and not location.listdir(folder):
            with contextlib.suppress(OSError):
                location.fs.rmdir(location.path(folder))


def shard_is_done(cache: CacheLocation, store: TeacherStore, shard_index: int) -> bool:
    """Whether the cache shard exists, checks out against its file, and was built from this store shard with the
    cache's settings (nothing is trusted by name)."""
    if not cache.exists(shard_doc_file(shard_index)):
        return False
    try:
        doc = cache.read_doc(shard_doc_file(shard_index))
        plan = cache.read_doc(PLAN_FILE)
        data = cache.read(shard_arrow_file(shard_index))
    except StoreError:
        return False
    return (
        doc.get("settings_fingerprint") == plan.get("settings_fingerprint")
        and doc.get("store_shard_checksum") == _store_shard_checksum(store, shard_index)
        and integrity.entry_problem(data, doc.get("file", {"num_bytes": -1})) is None
    )


def write_cache_shard(
    cache: CacheLocation, store: TeacherStore, shard_index: int, records: Sequence[AlignedSequence]
) -> dict[str, Any]:
    """Write one cache shard: its Arrow file, then its JSON (the commit marker). Returns the JSON document."""
    data = records_to_arrow(records)
    cache.location.write_bytes(data, cache.path(shard_arrow_file(shard_index)))
    plan = cache.read_doc(PLAN_FILE)
    return cache.write_doc(
        {
            "shard_index": shard_index,
            "settings_fingerprint": plan["settings_fingerprint"],
            "store_shard_checksum": _store_shard_checksum(store, shard_index),
            "num_sequences": len(records),
            "num_chunks": int(sum(r.num_chunks for r in records)),
            "num_groups": int(sum(r.num_groups for r in records)),
            "num_student_tokens": int(sum(len(r.student_token_id) for r in records)),
            "file": integrity.file_entry(data),
            "created_at": _now(),
        },
        shard_doc_file(shard_index),
    )


def finalize_cache(cache: CacheLocation, store: TeacherStore) -> dict[str, Any]:
    """Check that every store shard has a done cache shard, then write the cache manifest (last, atomically).

    Raises:
        StoreError: a shard is missing or stale (rerun `alm align`).
    """
    plan = cache.read_doc(PLAN_FILE)
    missing = [j for j in store.shard_indices if not shard_is_done(cache, store, j)]
    if missing:
        raise StoreError(
            f"alignment cache {store.url}/{cache.rel}: shards {missing} are not written or stale; rerun "
            "`alm align` with the same arguments (done shards are kept)"
        )
    shards = []
    for j in store.shard_indices:
        doc = cache.read_doc(shard_doc_file(j))
        shards.append(
            {
                "index": j,
                "path": shard_arrow_file(j),
                "doc": shard_doc_file(j),
                "checksum": doc[integrity.CHECKSUM_KEY],
                **{
                    k: doc[k]
                    for k in ("num_sequences", "num_chunks", "num_groups", "num_student_tokens")
                },
            }
        )
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "key": cache.key,
        "settings": plan["settings"],
        "settings_fingerprint": plan["settings_fingerprint"],
        "plan_checksum": plan[integrity.CHECKSUM_KEY],
        "shards": shards,
        "totals": {
            k: int(sum(s[k] for s in shards))
            for k in ("num_sequences", "num_chunks", "num_groups", "num_student_tokens")
        },
        "created_at": _now(),
    }
    return cache.write_doc(manifest, MANIFEST_FILE)


# --------------------------------------------------------------------------------------------------------------
# Reading


class AlignmentCache:
    """A finished alignment cache, opened and checked against its own manifest. Create with `open_cache`."""

    def __init__(self, cache: CacheLocation, manifest: dict[str, Any]) -> None:
        self.where = cache
        self.manifest = manifest
        self._shards = {int(s["index"]): s for s in manifest["shards"]}

    @property
    def url(self) -> str:
        return f"{self.where.location.url}/{self.where.rel}"

    @property
    def settings_fingerprint(self) -> str:
        return str(self.manifest["settings_fingerprint"])

    @property
    def shard_indices(self) -> list[int]:
        return sorted(self._shards)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest["settings"])

    def stale_reason(self, store: TeacherStore, settings: Mapping[str, Any]) -> str | None:
        """Why this cache does not give the targets `settings` would give on `store`, or None if it does."""
        wanted = full_settings(store, settings)
        if self.settings_fingerprint != json_fingerprint(wanted):
            return _settings_difference(self.settings, wanted)
        for j in store.shard_indices:
            entry = self._shards.get(j)
            if entry is None:
                return f"store shard {j} is not in the cache"
        if set(self._shards) != set(store.shard_indices):
            return "the cache has shards the store does not"
        return None

    def read_shard(self, store: TeacherStore, shard_index: int) -> CacheShard:
        """One cache shard, every file checked (JSON against the manifest, Arrow file against its JSON, the store
        shard it came from against the store's manifest).

        Raises:
            StoreCorruptError: a damaged or stale file, naming it.
        """
        entry = self._shards.get(shard_index)
        if entry is None:
            raise _corrupt(self.where, MANIFEST_FILE, f"does not list store shard {shard_index}")
        rel = str(entry["doc"])
        doc = self.where.read_doc(rel)
        if doc[integrity.CHECKSUM_KEY] != entry["checksum"]:
            raise _corrupt(self.where, rel, "differs from the version the cache manifest lists")
        if doc.get("store_shard_checksum") != _store_shard_checksum(store, shard_index):
            raise StoreMismatchError(
                f"alignment cache {self.url} was built from another version of store shard {shard_index} "
                f"(recorded {doc.get('store_shard_checksum')}, the store has "
                f"{_store_shard_checksum(store, shard_index)}); rebuild it with `alm align --overwrite`"
            )
        data_rel = str(entry["path"])
        try:
            data = self.where.read(data_rel)
        except StoreError:
            raise _corrupt(self.where, data_rel, "is missing") from None
        problem = integrity.entry_problem(data, doc["file"])
        if problem:
            raise _corrupt(self.where, data_rel, problem)
        try:
            table = _parse_arrow(data)
        except (pa.ArrowInvalid, OSError, ValueError) as err:
            raise _corrupt(self.where, data_rel, f"is not a readable cache shard ({err})") from None
        if table.num_rows != int(doc["num_sequences"]):
            raise _corrupt(
                self.where, data_rel, f"has {table.num_rows} rows, {doc['num_sequences']} recorded"
            )
        return CacheShard(table)


def open_cache(store: TeacherStore, key: str) -> AlignmentCache | None:
    """The finished cache `alignments/<key>/` of `store`, or None if there is none (or it is unfinished).

    Raises:
        StoreCorruptError: the cache manifest or plan is damaged.
    """
    cache = CacheLocation(store.location, key)
    if not cache.exists(MANIFEST_FILE):
        return None
    manifest = cache.read_doc(MANIFEST_FILE)
    if (
        manifest.get("format") != FORMAT_NAME
        or int(manifest.get("format_version", -1)) != FORMAT_VERSION
    ):
        raise _corrupt(
            cache,
            MANIFEST_FILE,
            f"is format {manifest.get('format')!r} version {manifest.get('format_version')}, this alm reads "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}",
        )
    plan = cache.read_doc(PLAN_FILE)
    if plan[integrity.CHECKSUM_KEY] != manifest.get("plan_checksum"):
        raise _corrupt(cache, PLAN_FILE, "differs from the version the cache manifest lists")
    return AlignmentCache(cache, manifest)


# --------------------------------------------------------------------------------------------------------------
# Verification


def record_problems(
    record: AlignedSequence, num_teacher_tokens: int, num_text_bytes: int
) -> list[str]:
    """Structural problems of one cached sequence: lengths, ranges inside both sequences, order."""
    problems = []
    for prefix, length_of in _LENGTH_OF.items():
        length = len(getattr(record, length_of))
        for name in LIST_COLUMNS:
            if name.startswith(prefix) and len(getattr(record, name)) != length:
                problems.append(
                    f"{name} has {len(getattr(record, name))} entries, {length_of} {length}"
                )
    if problems:
        return problems
    num_student = len(record.student_token_id)
    for side, limit in (("teacher", num_teacher_tokens), ("student", num_student)):
        for kind in ("chunk", "group"):
            start = getattr(record, f"{kind}_{side}_start")
            end = getattr(record, f"{kind}_{side}_end")
            if len(start) and (start.min() < 1 or (end <= start).any() or end.max() > limit):
                problems.append(
                    f"a {kind}'s {side} token range lies outside 1..{limit} or is empty"
                )
            if len(start) > 1 and (start[1:] < end[:-1]).any():
                problems.append(f"{kind}s overlap on the {side} side")
    if len(record.chunk_end_byte) and (
        (record.chunk_end_byte < record.chunk_start_byte).any()
        or record.chunk_end_byte.max() > num_text_bytes
    ):
        problems.append(f"a chunk's byte range lies outside the text's {num_text_bytes} bytes")
    if not np.isfinite(record.group_teacher_logp).all() or (record.group_teacher_logp > 0).any():
        problems.append("a group log-prob is not finite or is > 0")
    return problems


def verify_cache(store: TeacherStore, key: str) -> tuple[list[str], dict[str, int]]:
    """Check one cache of `store`: manifest and plan, every shard's files and checksums, the store shard each was
    built from, and every sequence's structure. Never raises for a damaged cache: the problems are returned, with
    counts (`num_shards`, `num_sequences`).
    """
    cache = CacheLocation(store.location, key)
    counts = {"num_shards": 0, "num_sequences": 0}
    if not cache.exists(MANIFEST_FILE):
        return [
            f"{cache.rel}: unfinished (no {MANIFEST_FILE}); rerun `alm align` to complete it"
        ], counts
    try:
        opened = open_cache(store, key)
    except StoreError as err:
        return [str(err)], counts
    assert opened is not None
    problems: list[str] = []
    recorded = {k: opened.settings.get(k) for k in store_facts(store)}
    if recorded != store_facts(store):
        problems.append(
            f"{cache.rel}: built from another store ({_settings_difference(recorded, store_facts(store))})"
        )
    if set(opened.shard_indices) != set(store.shard_indices):
        problems.append(
            f"{cache.rel}: caches shards {sorted(opened.shard_indices)}, the store has {store.shard_indices}"
        )
    for j in store.shard_indices:
        try:
            shard = opened.read_shard(store, j)
            stored = _store_index(store, j)
        except StoreError as err:
            problems.append(str(err))
            continue
        if shard.seq_id.tolist() != stored["seq_id"]:
            problems.append(
                f"{cache.rel}/{shard_arrow_file(j)}: sequence ids differ from store shard {j}'s"
            )
        else:
            for row, record in enumerate(shard.records()):
                found = record_problems(record, stored["num_tokens"][row], stored["num_bytes"][row])
                problems.extend(
                    f"{cache.rel}/{shard_arrow_file(j)} row {row} (seq_id={record.seq_id}): {p}"
                    for p in found[:3]
                )
        counts["num_shards"] += 1
        counts["num_sequences"] += shard.num_rows
    return problems, counts


def _store_index(store: TeacherStore, shard_index: int) -> dict[str, list[int]]:
    table = store.read_shard(shard_index, ["token_id"]).index
    return {name: table.column(name).to_pylist() for name in ("seq_id", "num_tokens", "num_bytes")}
