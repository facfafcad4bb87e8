"""Reading a teacher store: `open_store(path_or_url) -> TeacherStore` (`DESIGN.md`, the teacher store).

Owns the read path. Reads whole shards at once (one Zarr read per array, one Parquet read for the index);
per-sequence `StoredSequence`s are views (slices) into the shard's arrays, so iterating sequences costs little
more than reading the shard. Trusts only shards listed in the manifest; refuses an unfinished store unless
`allow_unfinished=True` (used by `alm inspect`). Imports numpy, pyarrow, zarr, and `alm.vocab` lazily for
`.vocab`; never torch or `alm.config`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from alm.errors import StoreError
from alm.store import schema
from alm.store._fs import Location, locate

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


def _read_raw_chunks(
    location: Location, array_path: str, meta: dict[str, Any]
) -> np.ndarray | None:
    """Read a token-chunked Zarr v3 array straight from its chunk files into one buffer.

    The fast path for alm's own layouts (codecs: little-endian `bytes`, optionally followed by one `blosc`
    compressor; regular chunks over the token axis; default "/" chunk keys): one file read per chunk, copied
    (version 1) or Blosc-decompressed (version 2) into the output. Returns None for any other layout, which then
    goes through zarr.
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
        return _read_blosc_chunks(location, array_path, shape, chunk_shape, dtype)
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(np.uint8)
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    suffix = "/0" * (len(shape) - 1)
    offsets = list(range(0, flat.nbytes, chunk_bytes))
    keys = [f"{array_path}/c/{c}{suffix}" for c in range(len(offsets))]
    fetched: dict[str, bytes] = {}
    if not location.is_local and keys:
        # one batched request: async filesystems (s3, gcs, http) fetch the chunks concurrently
        paths = [location.path(k) for k in keys]
        fetched = location.fs.cat(paths, on_error="omit")
        fetched = {k: fetched[p] for k, p in zip(keys, paths) if p in fetched}
    for key, offset in zip(keys, offsets):
        view = flat[offset : offset + chunk_bytes]
        if location.is_local:
            try:
                with open(location.path(key), "rb", buffering=0) as fh:
                    got = fh.readinto(view.data)
                    while got < len(view):  # readinto may return short reads
                        more = fh.readinto(view[got:].data)
                        if not more:
                            break
                        got += more
            except FileNotFoundError:
                view[:] = 0  # a chunk never written holds the fill value (0)
                continue
        elif key in fetched:
            data = fetched[key]
            got = min(len(data), len(view))
            view[:got] = np.frombuffer(data, dtype=np.uint8, count=got)
        else:
            view[:] = 0
            continue
        if got < len(view):
            raise StoreError(
                f"{location.url}/{key}: chunk file is shorter than its chunk ({got} < {len(view)} bytes)"
            )
    return out


def _read_blosc_chunks(
    location: Location,
    array_path: str,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    dtype: np.dtype,
) -> np.ndarray:
    """Decompress every Blosc chunk of a version 2 array into one output buffer (no intermediate copies)."""
    from numcodecs import blosc  # pyright: ignore[reportAttributeAccessIssue]  # a C extension

    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1).view(np.uint8)
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    suffix = "/0" * (len(shape) - 1)
    offsets = list(range(0, flat.nbytes, chunk_bytes))
    keys = [f"{array_path}/c/{c}{suffix}" for c in range(len(offsets))]
    if location.is_local or not keys:
        fetched = {}
    else:  # one batched request: async filesystems (s3, gcs, http) fetch the chunks concurrently
        paths = [location.path(k) for k in keys]
        got = location.fs.cat(paths, on_error="omit")
        fetched = {k: got[p] for k, p in zip(keys, paths) if p in got}
    for key, offset in zip(keys, offsets):
        view = flat[offset : offset + chunk_bytes]
        if location.is_local:
            try:
                with open(location.path(key), "rb", buffering=0) as fh:
                    data = fh.read()
            except FileNotFoundError:
                data = None
        else:
            data = fetched.get(key)
        if data is None:
            view[:] = 0  # a chunk never written holds the fill value (0)
            continue
        # the last chunk of an array is stored whole (padded to the chunk length): decode it aside when the
        # output ends inside it
        try:
            if len(view) == chunk_bytes:
                blosc.decompress(data, view)
            else:
                view[:] = np.frombuffer(blosc.decompress(data), dtype=np.uint8)[: len(view)]
        except (RuntimeError, ValueError) as err:
            raise StoreError(
                f"{location.url}/{key}: the chunk file cannot be decompressed ({err}); the store is damaged, "
                "recompute the shard"
            ) from err
    return out


def read_shard_arrays(
    location: Location, shard_path: str, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Read the named per-token arrays of one shard folder, each in one go (see `_read_raw_chunks`)."""
    arrays_path = f"{shard_path}/{schema.ARRAYS_DIR}"
    if names is None:
        group = zarr.open_group(location.zarr_store(arrays_path, read_only=True), mode="r")
        names = sorted(k for k, _ in group.arrays())
    out = {}
    for name in names:
        try:
            meta = location.read_json(arrays_path, name, "zarr.json")
        except StoreError as err:
            raise StoreError(f"{location.url}/{arrays_path}: no array `{name}` ({err})") from err
        arr = _read_raw_chunks(location, f"{arrays_path}/{name}", meta)
        if (
            arr is None
        ):  # another layout (compressed, rechunked): let zarr read the array's own metadata
            store = location.zarr_store(arrays_path, name, read_only=True)
            arr = np.asarray(zarr.open_array(store, mode="r")[...])
        out[name] = arr
    return out


def read_shard_index(
    location: Location, shard_path: str, columns: list[str] | None = None
) -> pa.Table:
    """A shard's per-sequence index (Arrow IPC file, Zstd-compressed buffers in version 2), optionally only some
    columns.

    Local files are memory-mapped (zero copy for version 1's uncompressed buffers; committed shard files are never
    modified in place, only replaced by rename), remote ones read in one request.
    """
    if location.is_local:
        path = location.path(shard_path, schema.INDEX_FILE)
        try:
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
        except FileNotFoundError as err:
            raise StoreError(f"{location.url}: missing file {path}") from err
    else:
        table = schema.index_from_bytes(location.read_bytes(shard_path, schema.INDEX_FILE))
    return table.select(columns) if columns is not None else table


class TeacherStore:
    """A finished (or, for inspection, unfinished) teacher store. Create with `open_store`."""

    def __init__(
        self, location: Location, manifest: dict[str, Any] | None, plan_doc: dict[str, Any]
    ) -> None:
        self.location = location
        self.plan_doc = plan_doc
        self._manifest = manifest
        self.format_version = int(
            (manifest or plan_doc).get("format_version", schema.FORMAT_VERSION)
        )
        if manifest is not None:
            self.shard_indices = [int(s["index"]) for s in manifest["shards"]]
            self.field_specs: dict[str, dict[str, Any]] = manifest["fields"]
        else:
            self.shard_indices = [
                j
                for j in range(int(plan_doc["plan"]["num_shards"]))
                if location.exists(self._shard_path(j), schema.SHARD_FILE)
            ]
            self.field_specs = plan_doc["field_specs"]
        hidden = self.field_specs.get("hidden")
        self.hidden_encoding: str | None = hidden.get("encoding") if hidden else None

    @staticmethod
    def _shard_path(j: int) -> str:
        return f"{schema.SHARDS_DIR}/shard-{j:05d}"

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def is_finished(self) -> bool:
        return self._manifest is not None

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (`alm-store.json`); for an unfinished store, a partial one built from the plan."""
        if self._manifest is not None:
            return self._manifest
        return {"unfinished": True, **self.plan_doc, "fields": self.field_specs}

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.field_specs)

    @cached_property
    def _shard_docs(self) -> dict[int, dict[str, Any]]:
        if self._manifest is not None:
            return {int(s["index"]): s for s in self._manifest["shards"]}
        return {
            j: self.location.read_json(self._shard_path(j), schema.SHARD_FILE)
            for j in self.shard_indices
        }

    @property
    def num_sequences(self) -> int:
        return sum(int(d["num_sequences"]) for d in self._shard_docs.values())

    @property
    def num_tokens(self) -> int:
        return sum(int(d["num_tokens"]) for d in self._shard_docs.values())

    def __len__(self) -> int:
        return self.num_sequences

    @cached_property
    def vocab_table(self) -> pa.Table:
        """The teacher's id->bytes table (`vocab/teacher_vocab.parquet`)."""
        if not self.location.exists(schema.VOCAB_TABLE_FILE):
            raise StoreError(
                f"store {self.url} has no {schema.VOCAB_TABLE_FILE}; the precompute did not write it"
            )
        return pq.read_table(pa.py_buffer(self.location.read_bytes(schema.VOCAB_TABLE_FILE)))

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

    def read_shard(self, shard_index: int, fields: list[str] | None = None) -> ShardData:
        """Read one whole shard (index + arrays). `fields` limits the arrays read (default: all stored).

        Raises:
            StoreError: the shard is not part of this store.
        """
        if shard_index not in self.shard_indices:
            raise StoreError(
                f"shard {shard_index} is not a finished shard of {self.url} (have {self.shard_indices})"
            )
        path = self._shard_path(shard_index)
        names = list(fields) if fields is not None else list(self.field_specs)
        unknown = [n for n in names if n not in self.field_specs]
        if unknown:
            raise StoreError(
                f"store {self.url} has no field(s) {unknown}; it stores {list(self.field_specs)}"
            )
        if "token_id" not in names:
            names.insert(0, "token_id")
        return ShardData(
            shard_index=shard_index,
            index=read_shard_index(self.location, path),
            arrays=read_shard_arrays(self.location, path, names),
            hidden_encoding=self.hidden_encoding,
        )

    def iter_shards(self, fields: list[str] | None = None) -> Iterator[ShardData]:
        """Whole shards in shard order (the fast path for data loaders: shuffle in memory)."""
        for j in self.shard_indices:
            yield self.read_shard(j, fields)

    def iter_sequences(self, fields: list[str] | None = None) -> Iterator[StoredSequence]:
        """Every sequence, shard by shard, in stored order."""
        for shard in self.iter_shards(fields):
            yield from shard.sequences()

    def __iter__(self) -> Iterator[StoredSequence]:
        return self.iter_sequences()


def read_manifest(location: Location) -> dict[str, Any] | None:
    if not location.exists(schema.MANIFEST_FILE):
        return None
    manifest = location.read_json(schema.MANIFEST_FILE)
    schema.check_format(manifest, f"{location.url}/{schema.MANIFEST_FILE}")  # versions 1 and 2
    return manifest


def open_store(
    path_or_url: str | os.PathLike[str], *, allow_unfinished: bool = False
) -> TeacherStore:
    """Open a teacher store folder or URL (`file://`, `memory://`, `s3://`, ... through fsspec).

    Args:
        path_or_url: the store root.
        allow_unfinished: open a store without a manifest (only its committed shards), for inspection.

    Raises:
        StoreError: no store there, another format or version, or an unfinished store.
    """
    location = locate(path_or_url)
    has_plan = location.exists(schema.PLAN_FILE)
    manifest = read_manifest(location)
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
    plan_doc = location.read_json(schema.PLAN_FILE) if has_plan else {}
    if plan_doc:
        schema.check_format(plan_doc, f"{location.url}/{schema.PLAN_FILE}")
    return TeacherStore(location, manifest, plan_doc)
