"""The teacher store format, version 1: names, dtypes, shapes, the per-sequence index schema, validation.

Owns every constant of the on-disk format (`docs/store.md` is its prose description): the format name and
version, the per-token field names with their dtypes and shapes, the boundary-class definition
(`ALM_SPEC.md §5.2`, §10.2 option 2: disjoint first-byte classes), the Arrow schema of the per-shard index (`index.arrow`), and the
checks that a sequence handed to the writer is well formed. Pure: imports numpy and pyarrow only; never torch,
never `alm.config`. The boundary classes are the store's own definition (the format is versioned apart from the
code); `tests/store/test_schema.py` checks that `alm.vocab` classifies tokens the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# The boundary classes are defined once, in alm.boundary; re-exported here for the store's readers and writers.
from alm.boundary import BOUNDARY_CLASS_FIRST_BYTES as BOUNDARY_CLASS_FIRST_BYTES
from alm.boundary import BOUNDARY_CLASS_NAMES as BOUNDARY_CLASS_NAMES
from alm.boundary import DEFAULT_BOUNDARY_CLASSES as DEFAULT_BOUNDARY_CLASSES
from alm.boundary import NUM_BOUNDARY_CLASSES as NUM_BOUNDARY_CLASSES
from alm.boundary import SPECIAL_CLASS as SPECIAL_CLASS
from alm.boundary import boundary_class_of as boundary_class_of
from alm.errors import StoreError

FORMAT_NAME = "alm-teacher-store"
FORMAT_VERSION = 1

MANIFEST_FILE = "alm-store.json"
PLAN_FILE = "alm-store.plan.json"
SHARDS_DIR = "shards"
SHARD_FILE = "shard.json"
INDEX_FILE = "index.arrow"  # Arrow IPC file (uncompressed): reads at memory speed
ARRAYS_DIR = "arrays"  # the shard's Zarr v3 group, inside the shard folder
VOCAB_DIR = "vocab"
VOCAB_TABLE_FILE = "vocab/teacher_vocab.parquet"
TOKENIZER_DIR = "vocab/tokenizer"

DEFAULT_FIELDS: tuple[str, ...] = ("token_id", "logp", "boundary_logmass")
OPTIONAL_FIELDS: tuple[str, ...] = ("topk_id", "topk_logp", "hidden")
ALL_FIELDS: tuple[str, ...] = DEFAULT_FIELDS + OPTIONAL_FIELDS
HIDDEN_ENCODINGS: tuple[str, ...] = ("bfloat16", "float16")

# Default Zarr chunk length along the token axis. Large chunks keep whole-shard reads close to memmap speed
# (per-chunk overhead dominates below ~100k tokens). Arrays are stored uncompressed for the same reason.
CHUNK_TOKENS = 262_144

SEGMENT_TYPE = pa.struct(
    [
        ("role", pa.string()),
        ("start_byte", pa.int64()),
        ("end_byte", pa.int64()),
        ("start_pos", pa.int64()),
        ("end_pos", pa.int64()),
    ]
)
LOSS_SPAN_TYPE = pa.struct([("start_byte", pa.int64()), ("end_byte", pa.int64())])

INDEX_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("token_start", pa.int64()),
        ("token_end", pa.int64()),
        ("text", pa.binary()),
        ("segments", pa.list_(SEGMENT_TYPE)),
        ("loss_spans", pa.list_(LOSS_SPAN_TYPE)),
        ("truncated", pa.bool_()),
        ("num_tokens", pa.int64()),
        ("num_bytes", pa.int64()),
    ]
)


@dataclass(frozen=True)
class FieldSpec:
    """One per-token array: numpy dtype, trailing shape after the token axis, and an optional encoding note."""

    name: str
    dtype: str
    trailing_shape: tuple[int, ...]
    encoding: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": ["N", *self.trailing_shape]}
        if self.encoding:
            out["encoding"] = self.encoding
        return out


def field_specs(
    fields: Iterable[str],
    *,
    top_k: int = 0,
    hidden_size: int = 0,
    hidden_encoding: str = "bfloat16",
) -> dict[str, FieldSpec]:
    """The dtype and shape of each stored field.

    Args:
        fields: field names; must include the three default fields.
        top_k: k of `topk_id`/`topk_logp` (required > 0 when those are stored).
        hidden_size: d of `hidden` (required > 0 when stored).
        hidden_encoding: `bfloat16` (stored as its uint16 bit pattern) or `float16`.

    Raises:
        StoreError: unknown field, a missing default field, or a missing size.
    """
    names = list(dict.fromkeys(fields))
    unknown = [n for n in names if n not in ALL_FIELDS]
    if unknown:
        raise StoreError(f"unknown store field(s) {unknown}; known fields are {list(ALL_FIELDS)}")
    missing = [n for n in DEFAULT_FIELDS if n not in names]
    if missing:
        raise StoreError(f"store fields {names} lack the required field(s) {missing}")
    if ("topk_id" in names) != ("topk_logp" in names):
        raise StoreError(f"store fields {names}: `topk_id` and `topk_logp` must be stored together")
    specs = {
        "token_id": FieldSpec("token_id", "int32", ()),
        "logp": FieldSpec("logp", "float32", ()),
        "boundary_logmass": FieldSpec("boundary_logmass", "float16", (NUM_BOUNDARY_CLASSES,)),
    }
    if "topk_id" in names:
        if top_k <= 0:
            raise StoreError(
                f"store fields include top-k but top_k={top_k}; set top_k to a positive k"
            )
        specs["topk_id"] = FieldSpec("topk_id", "int32", (top_k,))
        specs["topk_logp"] = FieldSpec("topk_logp", "float16", (top_k,))
    if "hidden" in names:
        if hidden_size <= 0:
            raise StoreError(
                f"store fields include `hidden` but hidden_size={hidden_size}; give the teacher's d"
            )
        if hidden_encoding not in HIDDEN_ENCODINGS:
            raise StoreError(
                f"hidden_encoding={hidden_encoding!r}; use one of {list(HIDDEN_ENCODINGS)}"
            )
        dtype = "uint16" if hidden_encoding == "bfloat16" else "float16"
        specs["hidden"] = FieldSpec("hidden", dtype, (hidden_size,), encoding=hidden_encoding)
    return specs


def boundary_classes_json() -> list[dict[str, Any]]:
    """The boundary-class definition as recorded in the manifest."""
    return [
        {
            "index": i,
            "name": name,
            "first_bytes": list(first),
            "rule": "special tokens only"
            if i == SPECIAL_CLASS
            else "non-special token whose first byte is listed",
        }
        for i, (name, first) in enumerate(zip(BOUNDARY_CLASS_NAMES, BOUNDARY_CLASS_FIRST_BYTES))
    ]


def _segment_tuple(seg: Any) -> tuple[str, int, int, int, int]:
    keys = ("role", "start_byte", "end_byte", "start_pos", "end_pos")
    if hasattr(seg, "role"):  # dataclasses and named tuples: by name, whatever their field order
        return tuple(getattr(seg, k) for k in keys)  # type: ignore[return-value]
    if isinstance(seg, Mapping):
        return tuple(seg[k] for k in keys)  # type: ignore[return-value]
    return tuple(seg)  # type: ignore[return-value]  # a plain 5-tuple in `keys` order


def _span_tuple(span: Any) -> tuple[int, int]:
    if hasattr(span, "start_byte"):
        return (int(span.start_byte), int(span.end_byte))
    if isinstance(span, Mapping):
        return (int(span["start_byte"]), int(span["end_byte"]))
    return (int(span[0]), int(span[1]))


def normalize_segments(segments: Iterable[Any]) -> list[dict[str, Any]]:
    """Segments as dicts with the index's keys; accepts mappings, 5-tuples or objects with those attributes."""
    out = []
    for seg in segments:
        role, sb, eb, sp, ep = _segment_tuple(seg)
        out.append(
            {
                "role": str(role),
                "start_byte": int(sb),
                "end_byte": int(eb),
                "start_pos": int(sp),
                "end_pos": int(ep),
            }
        )
    return out


def normalize_loss_spans(loss_spans: Iterable[Any] | np.ndarray | None) -> list[dict[str, int]]:
    """Loss spans as dicts `{start_byte, end_byte}`; accepts pairs, an [k, 2] array, mappings or objects."""
    if loss_spans is None:
        return []
    return [dict(zip(("start_byte", "end_byte"), _span_tuple(s))) for s in loss_spans]


def validate_sequence(
    seq_id: int,
    text: bytes,
    segments: list[dict[str, Any]],
    loss_spans: list[dict[str, int]],
    arrays: Mapping[str, np.ndarray],
    specs: Mapping[str, FieldSpec],
) -> int:
    """Check one sequence before it is written; return its number of tokens.

    Raises:
        StoreError: a missing or extra field, a wrong shape, a non-NaN first `logp`, or segments/loss spans outside
            the text or the tokens.
    """
    where = f"sequence seq_id={seq_id}"
    missing = [n for n in specs if arrays.get(n) is None]
    extra = [n for n, a in arrays.items() if a is not None and n not in specs]
    if missing or extra:
        raise StoreError(
            f"{where}: fields {sorted(n for n, a in arrays.items() if a is not None)} do not match the store's "
            f"fields {list(specs)} (missing {missing}, not declared {extra}); declare the fields when preparing "
            "the store"
        )
    num_tokens = len(arrays["token_id"])
    if num_tokens == 0:
        raise StoreError(f"{where} has no tokens; skip empty sequences before writing")
    for name, spec in specs.items():
        shape = np.shape(arrays[name])
        if shape != (num_tokens, *spec.trailing_shape):
            raise StoreError(
                f"{where}: `{name}` has shape {shape}, expected {(num_tokens, *spec.trailing_shape)}"
            )
    if not np.isnan(np.float32(arrays["logp"][0])):
        raise StoreError(
            f"{where}: logp[0] is {arrays['logp'][0]}, must be NaN (the first token has no context)"
        )
    num_bytes = len(text)
    for seg in segments:
        if not (0 <= seg["start_byte"] <= seg["end_byte"] <= num_bytes) or not (
            0 <= seg["start_pos"] <= seg["end_pos"] <= num_tokens
        ):
            raise StoreError(
                f"{where}: segment {seg} lies outside the text ({num_bytes} bytes) or tokens ({num_tokens})"
            )
    for span in loss_spans:
        if not (0 <= span["start_byte"] <= span["end_byte"] <= num_bytes):
            raise StoreError(f"{where}: loss span {span} lies outside the text ({num_bytes} bytes)")
    return num_tokens


def check_format(manifest_or_plan: Mapping[str, Any], where: str) -> None:
    """Refuse a plan or manifest of another format or a newer version.

    Raises:
        StoreError: naming the file and the versions.
    """
    name = manifest_or_plan.get("format")
    version = manifest_or_plan.get("format_version")
    if name != FORMAT_NAME:
        raise StoreError(
            f"{where} has format {name!r}, not {FORMAT_NAME!r}; this is not an alm teacher store"
        )
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{where} has format version {version}, this alm reads version {FORMAT_VERSION}; "
            "use the alm version that wrote it or recompute the store"
        )


def index_to_ipc_bytes(table: pa.Table) -> bytes:
    """A shard index as the bytes of an uncompressed Arrow IPC file (`pyarrow.ipc.open_file` reads it)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def index_from_ipc_bytes(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """Read a shard index written by `index_to_ipc_bytes` (optionally only some columns)."""
    table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    return table.select(columns) if columns is not None else table
