"""Writing a teacher store: the plan, one shard per writer, the vocabulary (`DESIGN.md`, the teacher store).

Owns the store layout on disk and the write path. Never imports torch or `alm.config`; the caller (precompute)
turns its recipe into a `StorePlan`. Usage, once per worker (idempotent for the same plan, so N workers may all
call it):

    plan = StorePlan(teacher_model="HuggingFaceTB/SmolLM2-135M-Instruct", tokenizer_fingerprint=vocab.fingerprint(),
                     data_spec_name="demo", data_spec_fingerprint="...", num_shards=4, max_length=1024)
    layout = prepare_store("out/store", plan, overwrite=False)   # refuses a foreign or different folder
    layout.write_vocab(vocab)                                   # vocab/teacher_vocab.parquet (Vocab.to_arrow())
    with layout.tokenizer_dir() as folder:                      # vocab/tokenizer/ (uploaded on exit for URLs)
        tokenizer.save_pretrained(folder)
    for j in my_shards:
        if layout.shard_done(j):
            continue                                            # resume: finished shards are never rewritten
        with ShardWriter(layout, j) as writer:                  # an exception inside leaves no finished shard
            for seq in sequences_of_shard(j):
                writer.add(seq_id=..., text=b"...", token_id=ids, logp=logp, boundary_logmass=bm,
                           segments=[...], loss_spans=[(s, e)], truncated=False, doc_id="...", source="...",
                           row=0)
    try_finalize(layout)                                        # alm.store.finalize: manifest when all are done

`add` takes per-token arrays of one sequence (`token_id` int32 [n], `logp` float32 [n] with NaN at 0,
`boundary_logmass` [n, 5] (cast to float16), optional `topk_id` int32 [n, k], `topk_logp` [n, k] (cast to
float16), `hidden` [n, d] as uint16 bfloat16 bits or float32 (converted)) and its index fields; the writer
computes `token_start`/`token_end`/`num_tokens`/`num_bytes`. Memory stays bounded: past `buffer_bytes` (256 MiB) of
buffered rows, full Zarr chunks are flushed.

Atomicity: on a local disk a shard is written into `shards/.tmp-shard-XXXXX-<random>/` and renamed to
`shards/shard-XXXXX/` when complete, `shard.json` written last; a killed writer leaves only a temp folder, which
is ignored and removed by the next writer of that shard. On object stores (no atomic rename) the shard is written
in place and `shard.json`, written last, is the commit marker; the manifest lists only committed shards.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from alm.errors import StoreBusyError, StoreError
from alm.store import integrity, schema
from alm.store._fs import Location, locate, write_error
from alm.store.fingerprint import ArrayHasher, bytes_fingerprint, json_fingerprint
from alm.store.owned import written_store_files
from alm.store.replace import move_aside, move_aside_remote

logger = logging.getLogger(__name__)

# Folders and files an alm store may contain; `--overwrite` moves these aside and later deletes only alm's files.
_STORE_ENTRIES = (
    schema.PLAN_FILE,
    schema.MANIFEST_FILE,
    schema.SHARDS_DIR,
    schema.VOCAB_DIR,
    "alignments",
    "README.md",  # the store card (alm.store.card.CARD_FILE)
    "alm-store.files.json",  # the file listing of a pushed or pulled store (alm.store.transfer.FILES_FILE)
)
# Plan keys that describe the run, not the result; they may differ between workers or on resume.
_INFORMATIONAL_PLAN_KEYS = ("backend_versions", "command")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StorePlan:
    """Everything that decides a store's content, fixed before the first shard is written.

    Attributes:
        teacher_model: HF model id or local path of the teacher.
        tokenizer_fingerprint: `Vocab.fingerprint()` of the teacher tokenizer.
        data_spec_name: name of the data spec the sequences come from.
        data_spec_fingerprint: fingerprint of the resolved data spec.
        num_shards: number of shards N (`--shard i/N` writes shard i).
        max_length: teacher tokens per sequence at most.
        fields: stored per-token fields (the three defaults, optionally top-k and `hidden`).
        top_k: k of the stored top-k (0 when not stored).
        hidden_size: teacher hidden size d when `hidden` is stored, else 0.
        hidden_encoding: `bfloat16` (uint16 bit patterns) or `float16`.
        precision: `exact` (stored as given) or `compact` (`logp` and `boundary_logmass` rounded to the mantissa
            bits of `schema.PRECISION_MANTISSA_BITS`; what `alm precompute` writes by default).
        compression: the codec preset (`schema.COMPRESSIONS`): `small` (default), `fast` or `none`
            (`schema.ARRAY_CODECS`, `schema.INDEX_ZSTD_LEVELS`). Left out of the plan's JSON when `small`, so a
            default plan is the plan of the alm versions before the presets.
        teacher_revision: model revision (commit) if known.
        teacher_config_hash: hash of the teacher's config.
        backend: `hf` or `vllm`.
        boundary_method: how `boundary_logmass` was computed: `exact` (HF logits), `token_ids` / `hidden` (vLLM,
            exact), or a top-k fallback such as `topk_lower`, `topk_upper`, `topk_mid`.
        boundary_top_k: the k of a top-k fallback (vLLM's `num_logprobs`); 0 for exact methods.
        settings: other result-deciding settings (e.g. template family, recipe hash); part of the identity.
        backend_versions: package versions (informational; not compared on resume).
        command: the command line of the first worker that wrote the plan, for the store card (informational).
    """

    teacher_model: str
    tokenizer_fingerprint: str
    data_spec_name: str
    data_spec_fingerprint: str
    num_shards: int
    max_length: int
    fields: tuple[str, ...] = schema.DEFAULT_FIELDS
    top_k: int = 0
    hidden_size: int = 0
    hidden_encoding: str = "bfloat16"
    precision: str = "exact"
    compression: str = schema.DEFAULT_COMPRESSION
    teacher_revision: str | None = None
    teacher_config_hash: str = ""
    backend: str = "hf"
    boundary_method: str = "exact"
    boundary_top_k: int = 0
    settings: Mapping[str, Any] = field(default_factory=dict)
    backend_versions: Mapping[str, str] = field(default_factory=dict)
    command: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if self.num_shards < 1:
            raise StoreError(f"num_shards={self.num_shards}; a store has at least one shard")
        schema.check_compression(self.compression)
        self.field_specs()  # validates fields / sizes

    def field_specs(self) -> dict[str, schema.FieldSpec]:
        return schema.field_specs(
            self.fields,
            top_k=self.top_k,
            hidden_size=self.hidden_size,
            hidden_encoding=self.hidden_encoding,
            precision=self.precision,
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fields"] = list(self.fields)
        out["settings"] = dict(self.settings)
        out["backend_versions"] = dict(self.backend_versions)
        if self.compression == schema.DEFAULT_COMPRESSION:
            del out[
                "compression"
            ]  # the plan (and its fingerprint) of a default store as before the presets
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StorePlan:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["fields"] = tuple(kwargs.get("fields", schema.DEFAULT_FIELDS))
        return cls(**kwargs)

    def identity(self) -> dict[str, Any]:
        """The plan without informational keys: two plans with equal identities write identical stores."""
        return {k: v for k, v in self.to_json().items() if k not in _INFORMATIONAL_PLAN_KEYS}

    def fingerprint(self) -> str:
        return json_fingerprint(self.identity())


@dataclass(frozen=True)
class StoreLayout:
    """Paths of one store and its plan; what every worker holds after `prepare_store`."""

    location: Location
    plan: StorePlan

    @property
    def url(self) -> str:
        return self.location.url

    def shard_path(self, shard_index: int) -> str:
        return schema.shard_path(shard_index)

    def shard_done(self, shard_index: int) -> bool:
        """True when shard j is committed (its `shard.json` exists in its final folder)."""
        return self.location.exists(self.shard_path(shard_index), schema.SHARD_FILE)

    def done_shards(self) -> list[int]:
        return [j for j in range(self.plan.num_shards) if self.shard_done(j)]

    def is_finished(self) -> bool:
        return self.location.exists(schema.MANIFEST_FILE)

    def write_vocab(self, vocab: Any) -> None:
        """Write `vocab/teacher_vocab.parquet` from a `Vocab` (`.to_arrow()`) or an Arrow table (atomic)."""
        table = vocab if isinstance(vocab, pa.Table) else vocab.to_arrow()
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        # written once: a resumed or later worker finds the same bytes there and leaves the file alone
        loc = self.location
        if loc.exists(schema.VOCAB_TABLE_FILE) and loc.read_bytes(schema.VOCAB_TABLE_FILE) == data:
            return
        loc.write_bytes(data, schema.VOCAB_TABLE_FILE)

    @contextlib.contextmanager
    def tokenizer_dir(self) -> Iterator[str]:
        """A local folder for `tokenizer.save_pretrained(folder)`; its files land in `vocab/tokenizer/`.

        Local stores get the real folder; for URLs the files go to a temporary folder uploaded on exit.
        """
        if self.location.is_local:
            path = self.location.path(schema.TOKENIZER_DIR)
            os.makedirs(path, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="alm-tokenizer-") as tmp:
            yield tmp
            for dirpath, _, files in os.walk(tmp):
                for name in files:
                    rel = os.path.relpath(os.path.join(dirpath, name), tmp).replace(os.sep, "/")
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        self.location.write_bytes(fh.read(), schema.TOKENIZER_DIR, rel)


def shard_file_entries(location: Location, shard_dir: str) -> dict[str, dict[str, Any]]:
    """Inventory (`num_bytes`, `crc32c`) of every file in a shard folder but `shard.json`, by relative path."""
    if location.is_local:
        return integrity.local_file_entries(location.path(shard_dir), exclude=(schema.SHARD_FILE,))
    root = location.path(shard_dir)
    out = {}
    for path in sorted(location.fs.find(root)):
        rel = path[len(root) :].lstrip("/")
        if rel != schema.SHARD_FILE:
            out[rel] = integrity.file_entry(location.fs.cat_file(path))
    return out


def plan_document(plan: StorePlan) -> dict[str, Any]:
    """The content of `alm-store.plan.json` (without its `checksum`, added when written)."""
    specs = plan.field_specs()
    return {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "plan": plan.to_json(),
        "plan_fingerprint": plan.fingerprint(),
        "field_specs": {name: spec.to_json() for name, spec in specs.items()},
        "boundary_classes": schema.boundary_classes_json(),
        "created_at": utc_now(),
    }


def read_plan(location: Location) -> StorePlan:
    """Read and check a store's plan file, for writing or finalizing (only the current format version).

    Raises:
        StoreError: no plan file, another format, or another version.
    """
    if not location.exists(schema.PLAN_FILE):
        raise StoreError(
            f"{location.url} has no {schema.PLAN_FILE}; it is not an alm teacher store"
        )
    doc = location.read_json(schema.PLAN_FILE)
    problem = integrity.document_problem(doc) if isinstance(doc, dict) else "is not a JSON object"
    if problem:
        raise integrity.corrupt(location.url, schema.PLAN_FILE, problem)
    schema.check_format(doc, f"{location.url}/{schema.PLAN_FILE}", for_writing=True)
    return StorePlan.from_json(doc["plan"])


def _plan_differences(old: StorePlan, new: StorePlan) -> list[str]:
    a, b = old.identity(), new.identity()
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def prepare_store(
    path_or_url: str | os.PathLike[str], plan: StorePlan, *, overwrite: bool = False
) -> StoreLayout:
    """Create a store folder for a plan, or reopen one with the same plan (resume; idempotent across workers).

    A non-empty folder that is not an alm store is always refused. An alm store with a different plan is refused
    unless `overwrite`, which removes only what an alm store contains (plan, manifest, shards, vocab, alignments).

    Raises:
        StoreError: the folder is foreign, or holds a store with a different plan and `overwrite` is False.
    """
    location = locate(path_or_url)
    entries = [e for e in location.listdir() if e] if location.isdir() else []
    if location.exists() and not location.isdir():
        raise StoreError(
            f"store path {location.url} is a file; give a folder path for the teacher store"
        )
    if entries:
        is_alm = schema.PLAN_FILE in entries or schema.MANIFEST_FILE in entries
        if not is_alm:
            raise StoreError(
                f"output folder {location.url} is not empty and is not an alm teacher store "
                f"(found {entries[:5]}); choose an empty or new folder. --overwrite only replaces alm stores, "
                "never other folders"
            )
        old_plan, diffs = None, ["(no plan file, a manifest only)"]
        if schema.PLAN_FILE in entries:
            try:
                old_plan = read_plan(location)
            except (StoreError, TypeError, KeyError) as err:  # another format version, or corrupt
                diffs = [f"unreadable plan: {err}"]
        if old_plan is not None and old_plan.identity() == plan.identity():
            logger.info(
                "reopening store %s (%d/%d shards done)", location.url, *_done_count(location, plan)
            )
            return StoreLayout(location, plan)
        if old_plan is not None:
            diffs = _plan_differences(old_plan, plan)
        if not overwrite:
            raise StoreError(
                f"output folder {location.url} holds an alm store made with different settings "
                f"({'; '.join(diffs)}); pass --overwrite to replace it, or choose another folder"
            )
        logger.warning(
            "--overwrite: replacing the alm store in %s (%s)", location.url, "; ".join(diffs)
        )
        if location.is_local:
            # moved aside, not deleted: its files go only once the new store is finished (finalize_store),
            # and then only the files alm wrote (alm.store.replace)
            move_aside(location.root, _STORE_ENTRIES)
        else:
            # object stores cannot rename a folder: alm's own files are moved aside one by one (a user's stay
            # in place), and deleted once the new store is finished, as on a local disk
            move_aside_remote(location, written_store_files(location))
    location.write_bytes(
        schema.json_bytes(integrity.with_checksum(plan_document(plan))), schema.PLAN_FILE
    )
    return StoreLayout(location, plan)


def _done_count(location: Location, plan: StorePlan) -> tuple[int, int]:
    layout = StoreLayout(location, plan)
    return len(layout.done_shards()), plan.num_shards


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ShardClaim:
    """The one-writer-per-shard claim: `shards/.claim-shard-XXXXX.json` with host, pid and start time, created
    atomically (a complete temp file hard-linked to the claim name, which fails if the name exists).

    A claim whose process is gone on this host is stale and taken over; a live claim, or one from another host
    (whose process cannot be checked from here), is refused with `StoreBusyError` naming its holder. On object
    stores the claim is created with fsspec's exclusive mode (`open(path, "xb")`: a conditional PUT on S3 and GCS),
    which fails when the claim exists; a filesystem without exclusive create gets no claim and a warning.
    Re-entrant within one process: `ShardWriter` takes the claim itself unless the caller already holds it.
    """

    def __init__(self, layout: StoreLayout, shard_index: int) -> None:
        self.layout = layout
        self.shard_index = shard_index
        self.rel = schema.claim_path(shard_index)
        self.held = False

    def __enter__(self) -> ShardClaim:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _describe(self, holder: Mapping[str, Any]) -> str:
        return f"host {holder.get('host')!r} pid {holder.get('pid')} (since {holder.get('started_at')})"

    def acquire(self) -> None:
        """Take the claim.

        Raises:
            StoreBusyError: another live worker (or a worker on another host) holds it.
        """
        loc = self.layout.location
        path = loc.path(self.rel)
        if loc.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": utc_now()}
        for _ in range(3):
            holder = self._read(path) if loc.is_local else self._read_remote(loc, path)
            if (
                holder is not None
                and holder.get("host") == me["host"]
                and holder.get("pid") == me["pid"]
            ):
                return  # this process holds it already (re-entrant)
            if holder is not None and not self._stale(holder):
                raise StoreBusyError(
                    f"shard {self.shard_index} of teacher store {self.layout.url} is being written by "
                    f"{self._describe(holder)}: two workers were given the same shard (check each worker's "
                    f"--shard i/N). If that worker is gone (e.g. on another machine), remove {path} and rerun"
                )
            if holder is not None:
                logger.warning(
                    "taking over the stale claim on shard %d of %s (%s is gone)",
                    self.shard_index,
                    self.layout.url,
                    self._describe(holder),
                )
            if not loc.is_local:
                if holder is not None:
                    with contextlib.suppress(FileNotFoundError):
                        loc.fs.rm(path)
                if self._create_remote(loc, path, me):
                    return
                continue  # someone else was faster: look at who
            if holder is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, f"{path}.stale-{uuid.uuid4().hex[:8]}")
                    for name in os.listdir(os.path.dirname(path)):
                        if name.startswith(os.path.basename(path) + ".stale-"):
                            with contextlib.suppress(FileNotFoundError):
                                os.remove(os.path.join(os.path.dirname(path), name))
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(me, fh)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    continue  # someone else was faster: look at who
                self.held = True
                return
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        raise StoreBusyError(
            f"could not claim shard {self.shard_index} of {self.layout.url}: other workers keep taking it"
        )

    def _create_remote(self, loc: Location, path: str, me: Mapping[str, Any]) -> bool:
        """Create the claim on an object store, exclusively; False when it exists already."""
        try:
            with loc.fs.open(path, "xb") as fh:
                fh.write(json.dumps(dict(me)).encode())
        except FileExistsError:
            return False
        except (
            ValueError,
            NotImplementedError,
            TypeError,
        ) as err:  # no exclusive create on this filesystem
            logger.warning(
                "%s cannot create files exclusively (%s): shard %d is written without a claim; make sure "
                "each worker gets its own --shard i/N",
                self.layout.url,
                err,
                self.shard_index,
            )
            return True
        self.held = True
        return True

    @staticmethod
    def _read_remote(loc: Location, path: str) -> dict[str, Any] | None:
        try:
            data = loc.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {"host": None, "pid": None, "started_at": "?", "unreadable": True}

    @staticmethod
    def _read(path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except ValueError:
            return {"host": None, "pid": None, "started_at": "?", "unreadable": True}

    @staticmethod
    def _stale(holder: Mapping[str, Any]) -> bool:
        if holder.get("unreadable"):
            return True  # claims are written whole before they are linked: only a foreign file is unreadable
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def release(self) -> None:
        """Drop the claim if this object took it."""
        if not self.held:
            return
        self.held = False
        loc = self.layout.location
        with contextlib.suppress(FileNotFoundError):
            if loc.is_local:
                os.remove(loc.path(self.rel))
            else:
                loc.fs.rm(loc.path(self.rel))


def _remove_shard_files(location: Location, folder: str) -> None:
    """Remove what a shard writer writes in a shard folder written in place (object stores); nothing else."""
    for name in (schema.SHARD_FILE, schema.INDEX_FILE, schema.INDEX_FILE_V2, schema.ARRAYS_DIR):
        location.remove(folder, name)


class ShardWriter:
    """Writes shard j of a store: one Zarr v3 group of per-token arrays, `index.arrows.zst`, then `shard.json`.

    Use as a context manager; leaving it with an exception discards the shard (see the module docstring).
    """

    def __init__(
        self,
        layout: StoreLayout,
        shard_index: int,
        *,
        fields: Iterable[str] | None = None,
        top_k: int | None = None,
        hidden_size: int | None = None,
        chunk_tokens: int = schema.CHUNK_TOKENS,
        buffer_bytes: int = 256 << 20,
    ) -> None:
        plan = layout.plan
        if not 0 <= shard_index < plan.num_shards:
            raise StoreError(
                f"shard index {shard_index} is outside 0..{plan.num_shards - 1} of this store"
            )
        for name, given, planned in (
            ("fields", tuple(fields) if fields is not None else None, plan.fields),
            ("top_k", top_k, plan.top_k),
            ("hidden_size", hidden_size, plan.hidden_size),
        ):
            if given is not None and given != planned:
                raise StoreError(
                    f"ShardWriter {name}={given!r} differs from the store plan's {planned!r}"
                )
        self.layout = layout
        self.shard_index = shard_index
        self.chunk_tokens = int(chunk_tokens)
        self.specs = plan.field_specs()
        row_bytes = sum(
            np.dtype(spec.dtype).itemsize * int(np.prod(spec.trailing_shape))
            for spec in self.specs.values()
        )
        # buffer up to ~buffer_bytes in memory, then flush whole chunks (bounded memory with `hidden`)
        self._buffer_limit_tokens = (
            max(1, buffer_bytes // (row_bytes * self.chunk_tokens)) * self.chunk_tokens
        )
        self._rows: list[dict[str, Any]] = []
        self._buffers: dict[str, list[np.ndarray]] = {name: [] for name in self.specs}
        self._buffered_tokens = 0
        self._written_tokens = 0
        self._num_bytes = 0
        self._hashers = {name: ArrayHasher() for name in self.specs}
        self._seen_seq_ids: set[int] = set()
        self._open = False
        self._dir = ""
        self._arrays: dict[str, Any] = {}
        self._claim = ShardClaim(layout, shard_index)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.close()
            except OSError as err:  # a full disk while committing: nothing partial is left
                self.abort()
                raise self._write_error(err) from None
            except (
                StoreError
            ):  # a write the location already turned into a message: still nothing partial
                self.abort()
                raise
        else:
            self.abort()
            if isinstance(exc, OSError):
                raise self._write_error(exc) from None

    def _write_error(self, err: OSError) -> StoreError:
        return write_error(
            err,
            f"shard {self.shard_index} ({self._written_tokens + self._buffered_tokens:,} tokens, "
            f"{err.filename or self.layout.location.path(self._dir)})",
            self.layout.url,
        )

    def open(self) -> None:
        """Claim the shard (unless this process holds its claim already) and start its temp folder.

        Raises:
            StoreBusyError: another worker holds the shard's claim.
        """
        loc = self.layout.location
        final = self.layout.shard_path(self.shard_index)
        self._claim.acquire()
        if loc.is_local:
            prefix = schema.temp_shard_prefix(self.shard_index)
            self._dir = f"{schema.SHARDS_DIR}/{prefix}{uuid.uuid4().hex[:8]}"
            for stale in loc.listdir(schema.SHARDS_DIR):
                if stale.startswith(prefix):
                    logger.info("removing leftover temp shard %s", stale)
                    loc.remove(schema.SHARDS_DIR, stale)
        else:
            self._dir = final
            _remove_shard_files(
                loc, final
            )  # leftovers of a killed writer (no shard.json: never trusted)
        self._group = zarr.open_group(
            loc.zarr_store(self._dir, schema.ARRAYS_DIR, read_only=False), mode="w", zarr_format=3
        )
        self._open = True

    def _create_arrays(self, first_flush_tokens: int, final: bool) -> None:
        # Zarr pads a partial last chunk to the full chunk length on disk. A shard that fits the buffer is
        # written at close with chunks of equal length (padding < number of chunks); a larger shard streams
        # fixed `chunk_tokens` chunks.
        if final:
            num_chunks = max(1, -(-first_flush_tokens // self.chunk_tokens))
            chunk = max(1, -(-first_flush_tokens // num_chunks))
        else:
            chunk = self.chunk_tokens
        for name, spec in self.specs.items():
            self._arrays[name] = self._group.create_array(
                name,
                shape=(0, *spec.trailing_shape),
                dtype=spec.dtype,
                chunks=(chunk, *spec.trailing_shape),
                compressors=schema.array_compressors(
                    spec.dtype, name, self.layout.plan.compression
                ),
                fill_value=0,
                config={
                    "write_empty_chunks": True
                },  # every chunk file exists, so readers can read files
                attributes={"encoding": spec.encoding} if spec.encoding else {},
            )

    def add(
        self,
        *,
        seq_id: int,
        text: bytes,
        token_id: np.ndarray,
        logp: np.ndarray,
        boundary_logmass: np.ndarray,
        segments: Iterable[Mapping[str, Any]] = (),
        loss_spans: Iterable[Any] | np.ndarray | None = None,
        truncated: bool = False,
        doc_id: str = "",
        source: str = "",
        row: int = -1,
        topk_id: np.ndarray | None = None,
        topk_logp: np.ndarray | None = None,
        hidden: np.ndarray | None = None,
    ) -> None:
        """Append one sequence. See the module docstring for shapes and dtypes.

        Raises:
            StoreError: the sequence does not fit the store's fields, a first `logp` is not NaN, a segment or loss
                span lies outside the text, or its `seq_id` was already added to this shard.
        """
        if not self._open:
            raise StoreError("ShardWriter.add called outside `with ShardWriter(...)`")
        seq_id = int(seq_id)
        if seq_id in self._seen_seq_ids:
            raise StoreError(
                f"seq_id={seq_id} was already added to shard {self.shard_index}; seq_ids must be unique"
            )
        if not isinstance(text, bytes | bytearray | memoryview):
            raise StoreError(
                f"seq_id={seq_id}: text must be bytes (the exact content bytes), got {type(text)}"
            )
        text = bytes(text)
        if hidden is not None and "hidden" in self.specs:
            hidden = np.asarray(hidden)
            if self.specs["hidden"].encoding == "bfloat16" and hidden.dtype != np.uint16:
                hidden = float32_to_bfloat16_bits(hidden.astype(np.float32))
        arrays = {
            "token_id": token_id,
            "logp": logp,
            "boundary_logmass": boundary_logmass,
            "topk_id": topk_id,
            "topk_logp": topk_logp,
            "hidden": hidden,
        }
        seg_rows = schema.normalize_segments(segments)
        span_rows = schema.normalize_loss_spans(loss_spans)
        num_tokens = schema.validate_sequence(seq_id, text, seg_rows, span_rows, arrays, self.specs)
        for name, spec in self.specs.items():
            values = np.asarray(arrays[name]).astype(spec.dtype, copy=False)
            if spec.mantissa_bits is not None:  # `precision: compact`
                values = schema.round_mantissa(values, spec.mantissa_bits)
            self._buffers[name].append(values)
        token_start = self._written_tokens + self._buffered_tokens
        self._rows.append(
            {
                "seq_id": seq_id,
                "doc_id": str(doc_id),
                "source": str(source),
                "row": int(row),
                "token_start": token_start,
                "token_end": token_start + num_tokens,
                "text": text,
                "segments": seg_rows,
                "loss_spans": span_rows,
                "truncated": bool(truncated),
                "num_tokens": num_tokens,
                "num_bytes": len(text),
            }
        )
        self._seen_seq_ids.add(seq_id)
        self._num_bytes += len(text)
        self._buffered_tokens += num_tokens
        if self._buffered_tokens >= self._buffer_limit_tokens:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        """Write buffered rows to the arrays: whole chunks only, unless `final`."""
        num_write = (
            self._buffered_tokens
            if final
            else (self._buffered_tokens // self.chunk_tokens) * self.chunk_tokens
        )
        with zarr.config.set(
            {"json_indent": None}
        ):  # compact zarr.json files (fixed bytes per shard)
            self._write_buffered(num_write, final)

    def _write_buffered(self, num_write: int, final: bool) -> None:
        if not self._arrays:
            self._create_arrays(num_write, final)
        if num_write == 0:
            return
        start, stop = self._written_tokens, self._written_tokens + num_write
        for name, arr in self._arrays.items():
            block = (
                np.concatenate(self._buffers[name])
                if self._buffers[name]
                else np.zeros((0,), arr.dtype)
            )
            head, tail = block[:num_write], block[num_write:]
            arr.resize((stop, *arr.shape[1:]))
            arr[start:stop] = head
            self._hashers[name].update(head)
            self._buffers[name] = [tail] if len(tail) else []
        self._written_tokens = stop
        self._buffered_tokens -= num_write

    def abort(self) -> None:
        """Discard the shard being written (a local temp folder is removed; nothing is committed)."""
        if not self._open:
            return
        self._open = False
        loc = self.layout.location
        try:
            if loc.is_local:
                loc.remove(self._dir)  # the temp folder is this writer's own
            else:
                _remove_shard_files(loc, self._dir)
        except OSError:  # best effort: the folder is never trusted without shard.json anyway
            logger.warning("could not remove the aborted shard folder %s", loc.path(self._dir))
        self._claim.release()

    def close(self) -> None:
        """Flush, write `index.arrows.zst` and `shard.json`, and commit the shard (rename on local disks)."""
        if not self._open:
            return
        loc = self.layout.location
        self._flush(final=True)
        # no consolidated metadata (version 2): it repeated every array's zarr.json in the group's (fixed bytes per
        # shard), and readers open arrays by name
        table = pa.Table.from_pylist(self._rows, schema=schema.INDEX_SCHEMA)
        index_bytes = schema.index_to_bytes(table, self.layout.plan.compression)
        loc.write_bytes(index_bytes, self._dir, schema.INDEX_FILE)
        plan = self.layout.plan
        seq_ids = sorted(self._seen_seq_ids)
        doc = {
            "format": schema.FORMAT_NAME,
            "format_version": schema.FORMAT_VERSION,
            "shard_index": self.shard_index,
            "num_shards": plan.num_shards,
            "plan_fingerprint": plan.fingerprint(),
            "tokenizer_fingerprint": plan.tokenizer_fingerprint,
            "data_spec_fingerprint": plan.data_spec_fingerprint,
            "num_sequences": len(self._rows),
            "num_tokens": self._written_tokens,
            "num_text_bytes": self._num_bytes,
            "seq_id_min": seq_ids[0] if seq_ids else None,
            "seq_id_max": seq_ids[-1] if seq_ids else None,
            "arrays": {
                name: {
                    "dtype": spec.dtype,
                    "shape": [self._written_tokens, *spec.trailing_shape],
                    "sha256": self._hashers[name].hexdigest(),
                }
                for name, spec in self.specs.items()
            },
            "index": {
                "file": schema.INDEX_FILE,
                "sha256": bytes_fingerprint(index_bytes),
                "num_rows": len(self._rows),
            },
            "num_disk_bytes": loc.size_bytes(self._dir),
            # no `backend_versions` (version 3): they were the plan's, which the plan file and manifest hold
            "created_at": utc_now(),
            # every file as written (whatever its codec), so each read can check what it reads
            "files": shard_file_entries(loc, self._dir),
        }
        doc = integrity.with_checksum(doc)
        loc.write_bytes(schema.json_bytes(doc), self._dir, schema.SHARD_FILE)
        self._open = False
        if loc.is_local:
            final = self.layout.shard_path(self.shard_index)
            if not loc.rename_dir(self._dir, final):
                logger.warning(
                    "shard %d was already committed by another writer; discarding this copy",
                    self.shard_index,
                )
                loc.remove(self._dir)
        self._claim.release()
        logger.info(
            "shard %d/%d committed: %d sequences, %d tokens",
            self.shard_index,
            plan.num_shards,
            len(self._rows),
            self._written_tokens,
        )
