"""Reading a teacher store: `open_store(path_or_url) -> TeacherStore` (`DESIGN.md`, the teacher store).

Owns the read path. Reads whole shards at once (one Zarr read per array, one Parquet read for the index);
per-sequence `StoredSequence`s are views (slices) into the shard's arrays, so iterating sequences costs little
more than reading the shard. Trusts only shards listed in the manifest; refuses an unfinished store unless
`allow_unfinished=True` (used by `alm inspect`). Imports numpy, pyarrow, zarr, and `alm.vocab` lazily for
`.vocab`; never torch or `alm.config`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.storage
from zarr.core.buffer import cpu

from alm.errors import StoreError
from alm.store import integrity, schema
from alm.store._fs import Location, locate
from alm.store.manifest import StoreManifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredSequence:
    """One stored teacher sequence. Array fields are views into the shard's arrays (do not write to them).

    Attributes:
        seq_id: global sequence id.
        doc_id, source, row: where the document came from.
        shard: the shard index it is stored in.
        text: the content bytes the teacher read (text segments concatenated, truncated where the tokens stop).
        segments: list of dicts `{role, start_byte, end_byte, start_pos, end_pos}` (positions relative to this
            sequence; blocks have `start_byte == end_byte`).
        loss_spans: int64 [k, 2] byte ranges `[start_byte, end_byte)` in `text`.
        truncated: whether the document was cut at `max_length` tokens.
        token_id: int32 [n] teacher ids that were scored.
        logp: float32 [n], `logp[q] = log p_T(token_q | tokens[:q])`, NaN at q=0.
        boundary_logmass: float32 [n, 5], log next-token mass per boundary class after token q.
        topk_id: int32 [n, k] or None.
        topk_logp: float32 [n, k] or None.
        hidden: [n, d] as stored (uint16 bfloat16 bits or float16) or None; see `hidden_float32()`.
    """

    seq_id: int
    doc_id: str
    source: str
    row: int
    shard: int
    text: bytes
    segments: list[dict[str, Any]]
    loss_spans: np.ndarray
    truncated: bool
    token_id: np.ndarray
    logp: np.ndarray
    boundary_logmass: np.ndarray
    topk_id: np.ndarray | None = None
    topk_logp: np.ndarray | None = None
    hidden: np.ndarray | None = None
    hidden_encoding: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_id)

    @property
    def num_bytes(self) -> int:
        return len(self.text)

    def hidden_float32(self) -> np.ndarray | None:
        if self.hidden is None:
            return None
        if self.hidden_encoding == "bfloat16":
            return (self.hidden.astype(np.uint32) << 16).view(np.float32)
        return self.hidden.astype(np.float32)


@dataclass(frozen=True)
class ShardData:
    """One whole shard, columnar: the index table and each per-token array as stored (flat over tokens).

    `arrays` keep their stored dtypes (`boundary_logmass` and `topk_logp` float16, `hidden` uint16/float16);
    row i of `index` owns tokens `[token_start[i], token_end[i])`.
    """

    shard_index: int
    index: pa.Table
    arrays: dict[str, np.ndarray]
    hidden_encoding: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.arrays["token_id"])

    def sequences(self) -> Iterator[StoredSequence]:
        """Per-sequence views; float16 fields are converted to float32 once for the whole shard."""
        arrays = dict(self.arrays)
        arrays["boundary_logmass"] = arrays["boundary_logmass"].astype(np.float32)
        if "topk_logp" in arrays:
            arrays["topk_logp"] = arrays["topk_logp"].astype(np.float32)
        cols = {
            name: self.index.column(name).to_pylist()
            for name in ("seq_id", "doc_id", "source", "row")
        }
        starts = self.index.column("token_start").to_numpy().tolist()
        ends = self.index.column("token_end").to_numpy().tolist()
        texts = self.index.column("text").to_pylist()
        segments = self.index.column("segments").to_pylist()
        truncated = self.index.column("truncated").to_pylist()
        # loss spans as one flat [total, 2] array plus per-row offsets: each sequence gets a slice
        spans_col = self.index.column("loss_spans").combine_chunks()
        span_offsets = spans_col.offsets.to_numpy().tolist() if self.index.num_rows else [0]
        span_values = spans_col.values
        all_spans = np.stack(
            [
                span_values.field("start_byte").to_numpy(zero_copy_only=False),
                span_values.field("end_byte").to_numpy(zero_copy_only=False),
            ],
            axis=1,
        ).astype(np.int64, copy=False)  # [total spans, 2]
        for i in range(self.index.num_rows):
            s, e = starts[i], ends[i]
            yield StoredSequence(
                seq_id=cols["seq_id"][i],
                doc_id=cols["doc_id"][i],
                source=cols["source"][i],
                row=cols["row"][i],
                shard=self.shard_index,
                text=texts[i],
                segments=segments[i],
                loss_spans=all_spans[span_offsets[i] : span_offsets[i + 1]],
                truncated=truncated[i],
                token_id=arrays["token_id"][s:e],
                logp=arrays["logp"][s:e],
                boundary_logmass=arrays["boundary_logmass"][s:e],
                topk_id=arrays["topk_id"][s:e] if "topk_id" in arrays else None,
                topk_logp=arrays["topk_logp"][s:e] if "topk_logp" in arrays else None,
                hidden=arrays["hidden"][s:e] if "hidden" in arrays else None,
                hidden_encoding=self.hidden_encoding,
            )


@dataclass(frozen=True)
class ShardCheck:
    """What the reads of one shard are checked against: its `shard.json` inventory (or, for stores written
    before inventories, nothing here; the caller compares the recorded array checksums instead).

    Attributes:
        url: the store, for messages.
        shard_path: the shard folder inside the store (`shards/shard-XXXXX`).
        shard_index: the shard's index, for messages; None when unknown.
        num_shards: the store's number of shards, for the fix in messages.
        files: relative path inside the shard -> `{num_bytes, sha256}`; None when the shard has no inventory.
    """

    url: str
    shard_path: str
    shard_index: int | None = None
    num_shards: int | None = None
    files: dict[str, dict[str, Any]] | None = None
    index_sha256: str | None = None  # stores without inventories record the index's hash only
    seen: set[str] = field(default_factory=set)  # files checked so far

    def error(self, rel: str, problem: str) -> StoreError:
        err = integrity.corrupt(
            self.url,
            f"{self.shard_path}/{rel}" if rel else self.shard_path,
            problem,
            shard_index=self.shard_index,
            num_shards=self.num_shards,
        )
        err.summary = f"{self.shard_path}/{rel} {problem}"  # pyright: ignore[reportAttributeAccessIssue]
        return err

    def _entry(self, rel: str):
        """The inventory entry of file `rel` (None for a store without inventories); marks it as read."""
        self.seen.add(rel)
        if self.files is None:
            return None
        entry = self.files.get(rel)
        if entry is None:
            raise self.error(rel, "is not listed in the shard's shard.json")
        return entry

    def check(self, rel: str, data: bytes | memoryview) -> None:
        """Raise unless `data` are exactly the bytes the writer recorded for file `rel`."""
        entry = self._entry(rel)
        problem = entry is not None and integrity.entry_problem(data, entry)
        if problem:
            raise self.error(rel, problem)

    def check_parts(self, rel: str, parts: tuple[bytes | memoryview, ...]) -> None:
        """`check` for a file read in pieces (a chunk read into its array, then its padding)."""
        entry = self._entry(rel)
        problem = entry is not None and integrity.parts_problem(parts, entry)
        if problem:
            raise self.error(rel, problem)

    def read(self, location: Location, rel: str) -> bytes:
        """A whole file of the shard, checked."""
        try:
            data = location.read_bytes(self.shard_path, rel)
        except StoreError:
            raise self.error(rel, "is missing") from None
        self.check(rel, data)
        return data

    def read_json(self, location: Location, rel: str) -> Any:
        data = self.read(location, rel)
        try:
            return json.loads(data)
        except ValueError as err:
            raise self.error(rel, f"is not valid JSON ({err})") from None


def _plan_chunks(
    location: Location,
    check: ShardCheck,
    array_rel: str,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, int, list[str], list[int], dict[str, bytes]]:
    """The output buffer of a token-chunked array, its byte view, the bytes per chunk, each chunk's file key and
    byte offset in the output, and (remote stores only) every chunk file fetched in one batched request."""
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(np.uint8)
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    suffix = "/0" * (len(shape) - 1)
    offsets = list(range(0, flat.nbytes, chunk_bytes))
    keys = [f"{array_rel}/c/{c}{suffix}" for c in range(len(offsets))]
    fetched: dict[str, bytes] = {}
    if not location.is_local and keys:
        # one batched request: async filesystems (s3, gcs, http) fetch the chunks concurrently
        paths = [location.path(check.shard_path, k) for k in keys]
        got = location.fs.cat(paths, on_error="omit")
        fetched = {k: got[p] for k, p in zip(keys, paths) if p in got}
    return out, flat, chunk_bytes, keys, offsets, fetched


def _read_raw_chunks(
    location: Location, check: ShardCheck, array_rel: str, meta: dict[str, Any]
) -> tuple[np.ndarray, list[Callable[[], None]]] | None:
    """Read a token-chunked Zarr v3 array straight from its chunk files into one buffer.

    The fast path for alm's own layouts (codecs: little-endian `bytes`, optionally followed by one `blosc`
    compressor; regular chunks over the token axis; default "/" chunk keys): one file read per chunk, copied
    (version 1, done here) or Blosc-decompressed (versions 2 and 3: returned as one task per chunk, for
    `_run_tasks`) into the output, each chunk file checked as it is read. A missing or short chunk file is an
    error (never the fill value). Returns the output and the tasks still to run, or None for any other layout,
    which then goes through zarr.
    """
    try:
        shape = tuple(meta["shape"])
        chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        blosc = len(codecs) == 2 and codecs[1].get("name") == "blosc"
        plain = (
            codecs[0] == {"name": "bytes", "configuration": {"endian": "little"}}
            and (len(codecs) == 1 or blosc)
            and meta["chunk_grid"]["name"] == "regular"
            and meta["chunk_key_encoding"]
            == {"name": "default", "configuration": {"separator": "/"}}
            and chunk_shape[1:] == shape[1:]
            and not meta.get("storage_transformers")
        )
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except (KeyError, TypeError):
        return None
    if not plain:
        return None
    if blosc:
        return _read_blosc_chunks(location, check, array_rel, shape, chunk_shape, dtype)
    out, flat, chunk_bytes, keys, offsets, fetched = _plan_chunks(
        location, check, array_rel, shape, chunk_shape, dtype
    )
    for key, offset in zip(keys, offsets):
        view = flat[offset : offset + chunk_bytes]
        # the last chunk is padded to a whole chunk on disk: its file holds `chunk_bytes`, the array less
        if location.is_local:
            try:
                with open(location.path(check.shard_path, key), "rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size != chunk_bytes:
                        raise check.error(
                            key,
                            f"has {size} bytes, its chunk has {chunk_bytes} (truncated or extended)",
                        )
                    got = fh.readinto(view.data)
                    while got < len(view):  # readinto may return short reads
                        more = fh.readinto(view[got:].data)
                        if not more:
                            break
                        got += more
                    padding = fh.read() if got == len(view) else b""
            except FileNotFoundError:
                raise check.error(key, "is missing (a chunk of the array)") from None
            if got < len(view):
                raise check.error(key, f"is shorter than its chunk ({got} < {len(view)} bytes)")
            check.check_parts(key, (view.data, padding))
        elif key in fetched:
            data = fetched[key]
            if len(data) != chunk_bytes:
                raise check.error(
                    key,
                    f"has {len(data)} bytes, its chunk has {chunk_bytes} (truncated or extended)",
                )
            check.check(key, data)
            view[:] = np.frombuffer(data, dtype=np.uint8, count=len(view))
        else:
            raise check.error(key, "is missing (a chunk of the array)")
    return out, []


def _read_array_via_zarr(
    location: Location, check: ShardCheck, array_rel: str, meta_bytes: bytes
) -> np.ndarray:
    """Any other Zarr layout (compressed, rechunked): with an inventory, the array's files are read and checked
    into memory and decoded from there (one read); without one, zarr reads the files itself."""
    if check.files is None:
        store = location.zarr_store(check.shard_path, array_rel, read_only=True)
        return np.asarray(zarr.open_array(store, mode="r")[...])
    prefix = f"{array_rel}/"
    contents: dict[str, Any] = {"zarr.json": cpu.Buffer.from_bytes(meta_bytes)}
    for rel in check.files:
        if rel.startswith(prefix) and rel != f"{prefix}zarr.json":
            contents[rel[len(prefix) :]] = cpu.Buffer.from_bytes(check.read(location, rel))
    store = zarr.storage.MemoryStore(contents, read_only=True)
    return np.asarray(zarr.open_array(store, mode="r")[...])


def _read_blosc_chunks(
    location: Location,
    check: ShardCheck,
    array_rel: str,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    dtype: np.dtype,
) -> tuple[np.ndarray, list[Callable[[], None]]]:
    """The output buffer of a Blosc-compressed array and one task per chunk that reads the chunk file, checks it
    against the shard's inventory and decompresses it into its place in the buffer (no intermediate copies); a
    missing chunk is an error. The tasks are independent: `_run_tasks` may run them in threads (file reads, CRC
    and Blosc all release the GIL)."""
    from numcodecs import blosc  # pyright: ignore[reportAttributeAccessIssue]  # a C extension

    out, flat, chunk_bytes, keys, offsets, fetched = _plan_chunks(
        location, check, array_rel, shape, chunk_shape, dtype
    )

    def decode(key: str, view: np.ndarray) -> None:
        if location.is_local:
            try:
                with open(location.path(check.shard_path, key), "rb", buffering=0) as fh:
                    data = fh.read()
            except FileNotFoundError:
                raise check.error(key, "is missing (a chunk of the array)") from None
        elif key in fetched:
            data = fetched[key]
        else:
            raise check.error(key, "is missing (a chunk of the array)")
        check.check(key, data)
        # the last chunk of an array is stored whole (padded to the chunk length): decode it aside when the
        # output ends inside it
        try:
            if len(view) == chunk_bytes:
                blosc.decompress(data, view)
            else:
                view[:] = np.frombuffer(blosc.decompress(data), dtype=np.uint8)[: len(view)]
        except (RuntimeError, ValueError) as err:
            raise check.error(key, f"cannot be decompressed ({err})") from None

    tasks: list[Callable[[], None]] = [
        functools.partial(decode, key, flat[offset : offset + chunk_bytes])
        for key, offset in zip(keys, offsets)
    ]
    return out, tasks


def read_threads() -> int:
    """Threads a whole-shard read decodes with: `ALM_STORE_READ_THREADS` if set (1 = no threads), else the CPUs
    this process may run on, at most `MAX_READ_THREADS`."""
    env = os.environ.get("ALM_STORE_READ_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise StoreError(
                f"ALM_STORE_READ_THREADS={env!r} is not a whole number; set it to the threads a store read "
                "may use (1 = none), or unset it"
            ) from None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_READ_THREADS, cpus))


MAX_READ_THREADS = 4
_pool_state: dict[
    str, Any
] = {}  # {"pid", "threads", "pool"}: one decode pool per process (forks make their own)
_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) starts with no pool and a fresh lock: another parent thread may have
    held the lock at the fork, and the parent's pool threads do not exist in the child."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool_state.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_pool(threads: int) -> ThreadPoolExecutor | None:
    """This process's decode thread pool (None for one thread); a forked child never uses its parent's."""
    if threads <= 1:
        return None
    with _pool_lock:
        state = _pool_state
        if state.get("pid") != os.getpid() or state.get("threads") != threads:
            state.update(
                pid=os.getpid(),
                threads=threads,
                pool=ThreadPoolExecutor(threads, thread_name_prefix="alm-store-read"),
            )
        return state["pool"]


def _run_tasks(tasks: list[Callable[[], Any]], threads: int | None = None) -> list[Any]:
    """Run independent tasks, in threads when more than one may be used; results in order. The first task that
    raises (in order) raises here, after every task has finished (no task still writes into a buffer then)."""
    pool = _read_pool(read_threads() if threads is None else threads) if len(tasks) > 1 else None
    if pool is None:
        return [task() for task in tasks]
    futures = [pool.submit(task) for task in tasks]
    wait(futures)
    return [f.result() for f in futures]


def read_shard_arrays(
    location: Location,
    shard_path: str,
    names: list[str],
    check: ShardCheck | None = None,
    *,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Read the named per-token arrays of one shard folder, each in one go, every file checked by `check`.

    Args:
        threads: decode threads (default `read_threads()`; 1 = in this thread).

    Raises:
        StoreCorruptError: a file is missing, or differs from what `check` records.
    """
    check = check or ShardCheck(location.url, shard_path)
    arrays, tasks = _plan_shard_arrays(location, check, names)
    _run_tasks(tasks, threads)
    return arrays


def _plan_shard_arrays(
    location: Location, check: ShardCheck, names: list[str]
) -> tuple[dict[str, np.ndarray], list[Callable[[], None]]]:
    """The output arrays of `read_shard_arrays` and the chunk decodes still to run into them (metadata read and
    checked here, and any layout other than alm's own read whole here through zarr)."""
    out = {}
    tasks: list[Callable[[], None]] = []
    for name in names:
        array_rel = f"{schema.ARRAYS_DIR}/{name}"
        meta_bytes = check.read(location, f"{array_rel}/zarr.json")
        try:
            meta = json.loads(meta_bytes)
        except ValueError as err:
            raise check.error(f"{array_rel}/zarr.json", f"is not valid JSON ({err})") from None
        with _damage_as_error(check, array_rel):
            planned = _read_raw_chunks(location, check, array_rel, meta)
            if planned is None:
                arr = _read_array_via_zarr(location, check, array_rel, meta_bytes)
            else:
                arr, more = planned
                tasks += [functools.partial(_checked_task, check, array_rel, t) for t in more]
        out[name] = arr
    return out, tasks


@contextlib.contextmanager
def _damage_as_error(check: ShardCheck, rel: str) -> Iterator[None]:
    """zarr or numpy refusing damaged metadata or bytes: a damaged file (StoreCorruptError), not a bug."""
    try:
        yield
    except StoreError:
        raise
    except Exception as err:
        raise check.error(rel, f"cannot be read ({type(err).__name__}: {err})") from None


def _checked_task(check: ShardCheck, rel: str, task: Callable[[], None]) -> None:
    with _damage_as_error(check, rel):
        task()


def read_shard_index(
    location: Location,
    shard_path: str,
    columns: list[str] | None = None,
    check: ShardCheck | None = None,
    format_version: int = schema.FORMAT_VERSION,
) -> pa.Table:
    """A shard's per-sequence index, optionally only some columns, its bytes checked.

    Version 3: `index.arrows.zst` (an Arrow IPC stream in one Zstd frame); versions 1 and 2: `index.arrow` (an
    Arrow IPC file). Local files are memory-mapped (committed shard files are never modified in place, only
    replaced by rename) and checked from the map, remote ones read in one request.

    Raises:
        StoreCorruptError: the file is missing, differs from what `check` records, or is not an index.
    """
    check = check or ShardCheck(location.url, shard_path)
    rel = schema.index_file(format_version)
    if location.is_local:
        path = location.path(shard_path, rel)
        try:
            data: Any = pa.memory_map(path).read_buffer()
        except FileNotFoundError:
            raise check.error(rel, "is missing") from None
    else:
        data = pa.py_buffer(check.read(location, rel))
    check.check(rel, memoryview(data))
    legacy = check.files is None and check.index_sha256 is not None
    if legacy and hashlib.sha256(memoryview(data)).hexdigest() != check.index_sha256:
        raise check.error(rel, f"differs from what {schema.SHARD_FILE} records")
    try:
        table = schema.index_from_bytes(data, format_version)
    except (pa.ArrowInvalid, OSError) as err:
        raise check.error(rel, f"is not a readable Arrow index ({err})") from None
    return table.select(columns) if columns is not None else table


class TeacherStore:
    """A finished (or, for inspection, unfinished) teacher store. Create with `open_store`.

    Every read is checked: opening a finished store checks the manifest's own checksum and the plan and
    vocabulary files it lists; reading a shard checks its `shard.json` against the manifest and every file read
    against `shard.json` (`alm.store.integrity`).
    """

    def __init__(
        self,
        location: Location,
        manifest_doc: dict[str, Any] | None,
        plan_doc: dict[str, Any],
        checked_files: Mapping[str, bytes] | None = None,
    ) -> None:
        self.location = location
        self.plan_doc = plan_doc
        self.manifest_doc = manifest_doc  # the JSON as written (None for an unfinished store)
        self._checked_shard_docs: dict[int, dict[str, Any]] = {}
        # store-level files (plan, vocabulary, tokenizer), kept once checked: each is read once per store object
        self._checked_files: dict[str, bytes] = dict(checked_files or {})
        self.manifest: StoreManifest
        if manifest_doc is not None:
            self.manifest = StoreManifest.from_json(manifest_doc)
        else:
            self.manifest = StoreManifest.from_plan(plan_doc, [])
            committed = [
                j
                for j in range(self.manifest.num_shards or 0)
                if location.exists(schema.shard_path(j), schema.SHARD_FILE)
            ]
            self.manifest = StoreManifest.from_plan(
                plan_doc, [self.shard_doc(j) for j in committed]
            )

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def format_version(self) -> int:
        return self.manifest.format_version

    @property
    def shard_indices(self) -> list[int]:
        return self.manifest.shard_indices

    @property
    def field_specs(self) -> Mapping[str, Mapping[str, Any]]:
        return self.manifest.fields

    @property
    def hidden_encoding(self) -> str | None:
        return self.manifest.hidden_encoding

    @property
    def num_shards(self) -> int | None:
        return self.manifest.num_shards

    @property
    def is_finished(self) -> bool:
        return self.manifest.finished

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.field_specs)

    @property
    def num_sequences(self) -> int:
        return self.manifest.num_sequences

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    def __len__(self) -> int:
        return self.num_sequences

    def store_file_bytes(self, rel: str) -> bytes:
        """A store-level file (plan, vocabulary), checked against the manifest's inventory when it lists it.

        Raises:
            StoreCorruptError: the file is missing or differs from what the manifest records.
        """
        data = self._checked_files.get(rel)
        if data is None:
            data = self._checked_files[rel] = _store_file_bytes(
                self.location, self.manifest.files, rel
            )
        return data

    def check_store_files(self) -> None:
        """Check every store-level file the manifest lists (plan, vocabulary table, tokenizer files).

        Raises:
            StoreCorruptError: naming the first missing or changed file.
        """
        for rel in self.manifest.files:
            self.store_file_bytes(rel)

    def tokenizer_files(self) -> dict[str, bytes] | None:
        """The saved teacher tokenizer's files (name inside `vocab/tokenizer/` -> bytes), as checked against the
        manifest on opening; None for a store whose manifest does not list them (written before inventories).
        """
        prefix = f"{schema.TOKENIZER_DIR}/"
        names = [rel for rel in self.manifest.files if rel.startswith(prefix)]
        if not names:
            return None
        return {rel[len(prefix) :]: self.store_file_bytes(rel) for rel in names}

    def shard_doc(self, shard_index: int) -> dict[str, Any]:
        """The shard's `shard.json`, checked against its own checksum and the manifest's record of it.

        Raises:
            StoreCorruptError: the file is missing, not JSON, changed, or differs from the manifest.
        """
        if shard_index in self._checked_shard_docs:
            return self._checked_shard_docs[shard_index]
        check = ShardCheck(self.url, schema.shard_path(shard_index), shard_index, self.num_shards)
        if not self.location.isdir(schema.shard_path(shard_index)):
            raise check.error(
                "", "is missing: the whole shard folder is gone (it is listed in alm-store.json)"
            )
        doc = check.read_json(self.location, schema.SHARD_FILE)
        problem = integrity.document_problem(doc) if isinstance(doc, dict) else "is not an object"
        if problem:
            raise check.error(schema.SHARD_FILE, problem)
        if self.manifest.finished:
            entry = self.manifest.shard(shard_index)
            if entry.checksum is not None:
                same = doc.get("checksum") == entry.checksum
            else:  # a store written before checksums: compare what the manifest copied
                same = (
                    doc.get("arrays") == entry.arrays
                    and doc.get("index", {}).get("sha256") == entry.index_sha256
                )
            if not same:
                raise check.error(
                    schema.SHARD_FILE,
                    f"differs from the shard recorded in {schema.MANIFEST_FILE} (replaced by another write?)",
                )
        self._checked_shard_docs[shard_index] = doc
        return doc

    def shard_check(self, shard_index: int) -> ShardCheck:
        """The checks reads of this shard must pass (from its verified `shard.json`)."""
        doc = self.shard_doc(shard_index)
        return ShardCheck(
            self.url,
            schema.shard_path(shard_index),
            shard_index,
            self.num_shards,
            doc.get("files"),
            doc.get("index", {}).get("sha256"),
        )

    @cached_property
    def vocab_table(self) -> pa.Table:
        """The teacher's id->bytes table (`vocab/teacher_vocab.parquet`), checked against the manifest."""
        if (
            not self.location.exists(schema.VOCAB_TABLE_FILE)
            and schema.VOCAB_TABLE_FILE not in self.manifest.files
        ):
            raise StoreError(
                f"store {self.url} has no {schema.VOCAB_TABLE_FILE}; the precompute did not write it"
            )
        data = self.store_file_bytes(schema.VOCAB_TABLE_FILE)
        try:
            return pq.read_table(pa.py_buffer(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise integrity.corrupt(
                self.url, schema.VOCAB_TABLE_FILE, f"is not a readable Parquet file ({err})"
            ) from None

    @cached_property
    def vocab(self) -> Any:
        """The teacher vocabulary as an `alm.vocab.Vocab` (from `vocab/teacher_vocab.parquet`)."""
        from alm.vocab import Vocab

        return Vocab.from_arrow(self.vocab_table)

    @property
    def tokenizer_path(self) -> str:
        """Path or URL of the saved teacher tokenizer files (`vocab/tokenizer/`)."""
        return (
            self.location.path(schema.TOKENIZER_DIR)
            if self.location.is_local
            else f"{self.url}/{schema.TOKENIZER_DIR}"
        )

    def read_shard(
        self,
        shard_index: int,
        fields: list[str] | None = None,
        check: ShardCheck | None = None,
        *,
        threads: int | None = None,
    ) -> ShardData:
        """Read one whole shard (index + arrays), checking every file read against `shard.json`.

        Args:
            shard_index: a finished shard of this store.
            fields: limits the arrays read (default: all stored); `token_id` is always read.
            check: the `shard_check(shard_index)` to check the reads with (its `seen` then names the files
                read, so a caller checking every file reads only the others); default a new one.
            threads: decode threads (default `read_threads()`: `ALM_STORE_READ_THREADS`, else the CPUs this
                process may use, at most 4); 1 decodes in the calling thread.

        Raises:
            StoreError: the shard is not part of this store, or a field is not stored.
            StoreCorruptError: a file of the shard is missing or differs from what was written.
        """
        if shard_index not in self.shard_indices:
            raise StoreError(
                f"shard {shard_index} is not a finished shard of {self.url} (have {self.shard_indices})"
            )
        path = schema.shard_path(shard_index)
        names = list(fields) if fields is not None else list(self.field_specs)
        unknown = [n for n in names if n not in self.field_specs]
        if unknown:
            raise StoreError(
                f"store {self.url} has no field(s) {unknown}; it stores {list(self.field_specs)}"
            )
        if "token_id" not in names:
            names.insert(0, "token_id")
        doc = self.shard_doc(shard_index)
        check = check or self.shard_check(shard_index)
        if check.files is not None:
            check.read(self.location, f"{schema.ARRAYS_DIR}/zarr.json")
        arrays, tasks = _plan_shard_arrays(self.location, check, names)
        # the index decodes beside the arrays' chunks (Zstd, Blosc, file reads and CRC release the GIL)
        index, *_ = _run_tasks(
            [
                functools.partial(
                    read_shard_index,
                    self.location,
                    path,
                    check=check,
                    format_version=self.format_version,
                ),
                *tasks,
            ],
            threads,
        )
        if check.files is None:
            _check_recorded_checksums(check, doc, arrays)
        for name, arr in arrays.items():
            recorded = doc.get("arrays", {}).get(name, {})
            if "shape" in recorded and list(arr.shape) != list(recorded["shape"]):
                raise check.error(
                    f"{schema.ARRAYS_DIR}/{name}/zarr.json",
                    f"gives shape {list(arr.shape)}, {schema.SHARD_FILE} records {recorded['shape']}",
                )
        if index.num_rows != int(doc.get("num_sequences", index.num_rows)):
            raise check.error(
                schema.index_file(self.format_version),
                f"has {index.num_rows} rows, {schema.SHARD_FILE} records {doc['num_sequences']}",
            )
        return ShardData(
            shard_index=shard_index,
            index=index,
            arrays=arrays,
            hidden_encoding=self.hidden_encoding,
        )

    def iter_shards(
        self, fields: list[str] | None = None, *, threads: int | None = None
    ) -> Iterator[ShardData]:
        """Whole shards in shard order (the fast path for data loaders: shuffle in memory); `threads` as for
        `read_shard`."""
        for j in self.shard_indices:
            yield self.read_shard(j, fields, threads=threads)

    def iter_sequences(self, fields: list[str] | None = None) -> Iterator[StoredSequence]:
        """Every sequence, shard by shard, in stored order."""
        for shard in self.iter_shards(fields):
            yield from shard.sequences()

    def __iter__(self) -> Iterator[StoredSequence]:
        return self.iter_sequences()


def _check_recorded_checksums(
    check: ShardCheck, doc: dict[str, Any], arrays: dict[str, np.ndarray]
) -> None:
    """A shard without a file inventory (written before inventories): compare the recorded checksums of the
    arrays (raw little-endian bytes; the index file's hash is checked as it is read)."""
    from alm.store.fingerprint import array_checksum

    for name, arr in arrays.items():
        want = doc.get("arrays", {}).get(name, {}).get("sha256")
        if want is not None and array_checksum(arr) != want:
            raise check.error(
                f"{schema.ARRAYS_DIR}/{name}",
                f"holds values whose checksum differs from {schema.SHARD_FILE}",
            )


def _store_file_bytes(
    location: Location, files: Mapping[str, Mapping[str, Any]], rel: str
) -> bytes:
    entry = files.get(rel)
    try:
        data = location.read_bytes(rel)
    except StoreError:
        if entry is None:
            raise
        raise integrity.corrupt(location.url, rel, "is missing") from None
    if entry is not None:
        problem = integrity.entry_problem(data, entry)
        if problem:
            raise integrity.corrupt(location.url, rel, problem)
    return data


def read_manifest(location: Location) -> StoreManifest | None:
    """The typed manifest, checked against its own checksum; None when the store is not finished.

    Raises:
        StoreCorruptError: the manifest is not valid JSON, its content changed since it was written, or it lacks
            a required entry.
        StoreError: another format or a newer version.
    """
    doc = read_manifest_doc(location)
    if doc is None:
        return None
    try:
        return StoreManifest.from_json(doc)
    except (KeyError, TypeError, ValueError) as err:
        raise integrity.corrupt(
            location.url, schema.MANIFEST_FILE, f"lacks a required entry ({err!r})"
        ) from None


def read_manifest_doc(location: Location) -> dict[str, Any] | None:
    """The manifest document (JSON as written), checked against its own checksum; None when not finished.

    Raises:
        StoreCorruptError: the manifest is not valid JSON or its content changed since it was written.
        StoreError: another format or a newer version.
    """
    if not location.exists(schema.MANIFEST_FILE):
        return None
    data = location.read_bytes(schema.MANIFEST_FILE)
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise integrity.corrupt(
            location.url, schema.MANIFEST_FILE, f"is not valid JSON ({err})"
        ) from None
    if not isinstance(manifest, dict):
        raise integrity.corrupt(location.url, schema.MANIFEST_FILE, "is not a JSON object")
    problem = integrity.document_problem(manifest)
    if problem:
        raise integrity.corrupt(location.url, schema.MANIFEST_FILE, problem)
    schema.check_format(manifest, f"{location.url}/{schema.MANIFEST_FILE}")
    return manifest


def open_store(
    path_or_url: str | os.PathLike[str], *, allow_unfinished: bool = False
) -> TeacherStore:
    """Open a teacher store folder or URL (`file://`, `memory://`, `s3://`, ... through fsspec).

    A finished store's manifest, plan and vocabulary files are checked here (small files); shards are checked
    as they are read (`TeacherStore.read_shard`).

    Args:
        path_or_url: the store root.
        allow_unfinished: open a store without a manifest (only its committed shards), for inspection.

    Raises:
        StoreError: no store there, another format or version, or an unfinished store.
        StoreCorruptError: the manifest, plan or a vocabulary file is missing or changed.
    """
    location = locate(path_or_url)
    has_plan = location.exists(schema.PLAN_FILE)
    manifest = read_manifest_doc(location)
    if manifest is None and not has_plan:
        raise StoreError(
            f"no teacher store at {location.url} (no {schema.MANIFEST_FILE}); give the folder that "
            "`alm precompute` wrote"
        )
    if manifest is None and not allow_unfinished:
        raise StoreError(
            f"teacher store {location.url} is unfinished (no {schema.MANIFEST_FILE}); finish the precompute "
            f"(rerun the same command for the missing shards) or run `alm store finalize {location.url}`"
        )
    plan_doc: dict[str, Any] = {}
    checked_files: dict[str, bytes] = {}
    files = (manifest or {}).get("files") or {}
    if has_plan or schema.PLAN_FILE in files:
        data = checked_files[schema.PLAN_FILE] = _store_file_bytes(
            location, files, schema.PLAN_FILE
        )
        try:
            plan_doc = json.loads(data)
        except ValueError as err:
            raise integrity.corrupt(
                location.url, schema.PLAN_FILE, f"is not valid JSON ({err})"
            ) from None
        problem = integrity.document_problem(plan_doc)
        if problem:
            raise integrity.corrupt(location.url, schema.PLAN_FILE, problem)
        schema.check_format(plan_doc, f"{location.url}/{schema.PLAN_FILE}")
    try:
        store = TeacherStore(location, manifest, plan_doc, checked_files)
    except (KeyError, TypeError, ValueError) as err:
        damaged = schema.MANIFEST_FILE if manifest is not None else schema.PLAN_FILE
        raise integrity.corrupt(
            location.url, damaged, f"lacks a required entry ({err!r})"
        ) from None
    store.check_store_files()
    return store
