"""The teacher store format, version 3: names, dtypes, shapes, codecs, the per-sequence index schema, validation.

Owns every constant of the on-disk format (`docs/store.md` is its prose description): the format name and
version, the per-token field names with their dtypes and shapes, the boundary-class definition
(`ALM_SPEC.md §5.2`, §10.2 option 2: disjoint first-byte classes), the Arrow schema of the per-shard index, and the
checks that a sequence handed to the writer is well formed. Pure: imports numpy and pyarrow only; never torch,
never `alm.config`. The boundary classes are the store's own definition (the format is versioned apart from the
code); `tests/store/test_schema.py` checks that `alm.vocab` classifies tokens the same way.

Version 3 (this code writes it) compresses every array (by default Blosc zstd with byte shuffle; the `compression`
presets of `ARRAY_CODECS` trade size for read speed), writes the index as one Zstd frame holding an Arrow IPC stream
(`index.arrows.zst`, `index_to_bytes`), lists each shard file with
its CRC-32C (`alm.store.integrity`), writes compact JSON without consolidated Zarr metadata, and can round `logp` /
`boundary_logmass` to fewer mantissa bits (`precision: compact`, `PRECISION_MANTISSA_BITS`). Versions 1 and 2 are
still read (`READABLE_FORMAT_VERSIONS`): version 2 differs in the index (`index.arrow`, an Arrow IPC file with
Zstd-compressed buffers) and the inventory checksums (sha256); version 1 stored everything uncompressed. The codec
choice is measured by `bench/bench_store_codecs.py`; the figures are in `docs/store.md`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

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
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS: tuple[int, ...] = (1, 2, 3)

MANIFEST_FILE = "alm-store.json"
PLAN_FILE = "alm-store.plan.json"
SHARDS_DIR = "shards"
SHARD_FILE = "shard.json"
INDEX_FILE = (
    "index.arrows.zst"  # version 3: one Zstd frame holding an Arrow IPC stream (`index_to_bytes`)
)
INDEX_FILE_V2 = (
    "index.arrow"  # versions 1 and 2: an Arrow IPC file (version 2: Zstd-compressed buffers)
)
ARRAYS_DIR = "arrays"  # the shard's Zarr v3 group, inside the shard folder
VOCAB_DIR = "vocab"
VOCAB_TABLE_FILE = "vocab/teacher_vocab.parquet"
TOKENIZER_DIR = "vocab/tokenizer"

# The shard layout: shard j lives in `shards/shard-{j:05d}/`, is written into `shards/.tmp-shard-{j:05d}-<random>/`
# and renamed, and its writer holds `shards/.claim-shard-{j:05d}.json` while it works. Every module names these
# paths through the functions below.
SHARD_DIR_PATTERN = re.compile(r"shard-\d{5}")
TEMP_SHARD_DIR_PREFIX = ".tmp-shard-"
CLAIM_FILE_PATTERN = re.compile(r"\.claim-shard-\d{5}\.json")


def shard_dirname(shard_index: int) -> str:
    """The folder name of shard j inside `shards/` (`shard-00003`)."""
    return f"shard-{shard_index:05d}"


def shard_path(shard_index: int) -> str:
    """The path of shard j's folder relative to the store root (`shards/shard-00003`)."""
    return f"{SHARDS_DIR}/{shard_dirname(shard_index)}"


def temp_shard_prefix(shard_index: int) -> str:
    """The name prefix of shard j's temporary folders inside `shards/` (`.tmp-shard-00003-`)."""
    return f".tmp-{shard_dirname(shard_index)}-"


def claim_path(shard_index: int) -> str:
    """The path of shard j's writer claim relative to the store root (`shards/.claim-shard-00003.json`)."""
    return f"{SHARDS_DIR}/.claim-{shard_dirname(shard_index)}.json"


DEFAULT_FIELDS: tuple[str, ...] = ("token_id", "logp", "boundary_logmass")
OPTIONAL_FIELDS: tuple[str, ...] = ("topk_id", "topk_logp", "hidden")
ALL_FIELDS: tuple[str, ...] = DEFAULT_FIELDS + OPTIONAL_FIELDS
HIDDEN_ENCODINGS: tuple[str, ...] = ("bfloat16", "float16")

# Default Zarr chunk length along the token axis. Large chunks keep whole-shard reads close to memmap speed
# (per-chunk overhead dominates below ~100k tokens).
CHUNK_TOKENS = 262_144

# Array compression (`compression` in the plan and the precompute recipe), chosen per field by
# `bench/bench_store_codecs.py` on real teacher stores (the tables are in docs/store.md). Each preset names, per
# field, a Blosc codec `(cname, clevel, shuffle)` (Zarr's `blosc` codec, self-describing: plain zarr decodes any of
# them) or None for no compressor (Zarr's `bytes` codec alone, as in version 1):
#   small (default): Blosc zstd level 7 with byte shuffle, the smallest of the codecs Zarr ships for every field
#     (plain Zstd, bit shuffle, lz4 and lz4hc are all larger); zstd decodes at the same speed whatever the level,
#     about 1 GB/s on one core of the development machine, which is what bounds a whole-shard read.
#   fast: Blosc lz4hc level 9 with byte shuffle for the integer fields and `logp` (3-4x faster to decode than
#     zstd, no entropy coding; 1.2x zstd's size), no compression for the float16 fields, whose mantissa bits are
#     close to random: lz4hc saves only a fifth of `boundary_logmass` (8.0 of 10 bytes per token) and decodes at
#     a third of a memory copy.
#   none: uncompressed (18 bytes per token for the default fields; reads run at memory-copy speed).
# Version 2 used Blosc zstd level 5 for every array.
COMPRESSIONS: tuple[str, ...] = ("small", "fast", "none")
DEFAULT_COMPRESSION = "small"
BloscChoice = tuple[  # (cname, clevel, shuffle) of Zarr's BloscCodec
    Literal["lz4", "lz4hc", "blosclz", "zlib", "zstd"],
    int,
    Literal["noshuffle", "shuffle", "bitshuffle"],
]
_ZSTD: BloscChoice = ("zstd", 7, "shuffle")
_LZ4HC: BloscChoice = ("lz4hc", 9, "shuffle")
ARRAY_CODECS: dict[str, dict[str, BloscChoice | None]] = {
    "small": dict.fromkeys(ALL_FIELDS, _ZSTD),
    "fast": {
        "token_id": _LZ4HC,
        "logp": _LZ4HC,
        "boundary_logmass": None,
        "topk_id": _LZ4HC,
        "topk_logp": None,
        "hidden": None,
    },
    "none": dict.fromkeys(ALL_FIELDS, None),
}
BLOSC_BLOCKSIZE = (
    1 << 20
)  # bytes per Blosc block: large blocks decode about twice as fast as the automatic size

# Precision of the stored floats. `exact` keeps float32 `logp` and float16 `boundary_logmass` bit for bit as the
# writer received them (after the float16 cast); `compact` rounds their mantissas to the bits given here (the
# dtype stays the same, the low bits become zero and compress away). The relative error of every value is at most
# 2**-(bits + 1). On the demo store (logp 10 bits, the version 2 default) the ALM loss moved by 1.3e-5 and its
# gradient by 1.8e-4 relative (mostly a few gamma-merge decisions at the 0.1 threshold that flip;
# tests/store/test_store_precision.py checks < 1e-3). Fewer boundary_logmass bits flip more merges (6 bits:
# 4.5e-4, 5 bits: 6.7e-4); logp is insensitive (8 bits: 1.4e-5), so version 3 keeps 8 of its bits (0.3 B/token
# less on the demo store). Other fields are always exact.
PRECISIONS: tuple[str, ...] = ("exact", "compact")
PRECISION_MANTISSA_BITS: dict[str, dict[str, int]] = {
    "exact": {},
    "compact": {"logp": 8, "boundary_logmass": 7},
}

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
    mantissa_bits: int | None = (
        None  # rounded to this many mantissa bits (`precision: compact`); None: exact
    )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": ["N", *self.trailing_shape]}
        if self.encoding:
            out["encoding"] = self.encoding
        if self.mantissa_bits is not None:
            out["mantissa_bits"] = self.mantissa_bits
        return out


def field_specs(
    fields: Iterable[str],
    *,
    top_k: int = 0,
    hidden_size: int = 0,
    hidden_encoding: str = "bfloat16",
    precision: str = "exact",
) -> dict[str, FieldSpec]:
    """The dtype and shape of each stored field.

    Args:
        fields: field names; must include the three default fields.
        top_k: k of `topk_id`/`topk_logp` (required > 0 when those are stored).
        hidden_size: d of `hidden` (required > 0 when stored).
        hidden_encoding: `bfloat16` (stored as its uint16 bit pattern) or `float16`.
        precision: `exact` or `compact` (`PRECISION_MANTISSA_BITS`).

    Raises:
        StoreError: unknown field, a missing default field, a missing size, or an unknown precision.
    """
    if precision not in PRECISIONS:
        raise StoreError(f"store precision {precision!r}; use one of {list(PRECISIONS)}")
    bits = PRECISION_MANTISSA_BITS[precision]
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
        "logp": FieldSpec("logp", "float32", (), mantissa_bits=bits.get("logp")),
        "boundary_logmass": FieldSpec(
            "boundary_logmass",
            "float16",
            (NUM_BOUNDARY_CLASSES,),
            mantissa_bits=bits.get("boundary_logmass"),
        ),
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


SEGMENT_KEYS: tuple[str, ...] = ("role", "start_byte", "end_byte", "start_pos", "end_pos")


def normalize_segments(segments: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Segments as dicts with the index's keys, in the index's order (the rendered and stored segment tables).

    Raises:
        StoreError: a segment is not a mapping with the keys `SEGMENT_KEYS`.
    """
    out = []
    for seg in segments:
        if not isinstance(seg, Mapping) or any(k not in seg for k in SEGMENT_KEYS):
            raise StoreError(
                f"segment {seg!r} is not a mapping with the keys {list(SEGMENT_KEYS)}; pass the segment table "
                "of `alm.templates.render` (or of a stored sequence)"
            )
        out.append(
            {
                "role": str(seg["role"]),
                **{k: int(seg[k]) for k in SEGMENT_KEYS[1:]},
            }
        )
    return out


def normalize_loss_spans(loss_spans: Iterable[Any] | np.ndarray | None) -> list[dict[str, int]]:
    """Loss spans as dicts `{start_byte, end_byte}` from `(start_byte, end_byte)` pairs or an int [k, 2] array."""
    if loss_spans is None:
        return []
    pairs = np.asarray(list(loss_spans), dtype=np.int64).reshape(-1, 2)  # [k, 2]
    return [{"start_byte": int(a), "end_byte": int(b)} for a, b in pairs.tolist()]


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


def check_format(
    manifest_or_plan: Mapping[str, Any], where: str, *, for_writing: bool = False
) -> int:
    """Refuse a plan or manifest of another format or an unknown version; return its format version.

    Args:
        manifest_or_plan: the parsed JSON document.
        where: the file, for messages.
        for_writing: only the current version (`FORMAT_VERSION`) is accepted: shards are never added to a store of
            an older version.

    Raises:
        StoreError: naming the file and the versions.
    """
    name = manifest_or_plan.get("format")
    version = manifest_or_plan.get("format_version")
    if name != FORMAT_NAME:
        raise StoreError(
            f"{where} has format {name!r}, not {FORMAT_NAME!r}; this is not an alm teacher store"
        )
    if for_writing and version != FORMAT_VERSION:
        raise StoreError(
            f"{where} has format version {version}, this alm writes version {FORMAT_VERSION}; finish it with "
            "the alm version that started it, or recompute it into a new folder (or pass --overwrite)"
        )
    if version not in READABLE_FORMAT_VERSIONS:
        raise StoreError(
            f"{where} has format version {version}, this alm reads versions "
            f"{list(READABLE_FORMAT_VERSIONS)}; use the alm version that wrote it or recompute the store"
        )
    return int(version)


def json_bytes(document: Any) -> bytes:
    """A JSON file of the store (plan, shard.json, manifest) as compact UTF-8 bytes (version 2: no indentation)."""
    return json.dumps(document, separators=(",", ":")).encode()


def check_compression(compression: str) -> str:
    """Refuse an unknown compression preset; return it.

    Raises:
        StoreError: naming the presets.
    """
    if compression not in COMPRESSIONS:
        raise StoreError(
            f"store compression {compression!r}; use one of {list(COMPRESSIONS)} (docs/store.md)"
        )
    return compression


def array_compressors(
    dtype: str, field: str, compression: str = DEFAULT_COMPRESSION
) -> list[Any] | None:
    """The Zarr v3 compressors of per-token array `field` (numpy `dtype`) under a compression preset; None for
    no compressor."""
    from zarr.codecs import BloscCodec

    choice = ARRAY_CODECS[check_compression(compression)][field]
    if choice is None:
        return None
    cname, clevel, shuffle = choice
    return [
        BloscCodec(
            cname=cname,
            clevel=clevel,
            shuffle=shuffle,
            typesize=np.dtype(dtype).itemsize,
            blocksize=BLOSC_BLOCKSIZE,
        )
    ]


def codec_label(field: str, compression: str = DEFAULT_COMPRESSION) -> str:
    """The array codec of `field` under a preset in `bench/bench_store_codecs.py`'s naming."""
    choice = ARRAY_CODECS[check_compression(compression)][field]
    if choice is None:
        return "none"
    cname, clevel, shuffle = choice
    return f"blosc {cname} {clevel} {shuffle}"


# The index (version 3) is one Zstd frame holding an Arrow IPC stream, at level 19 (`compression: small`): measured
# by bench/bench_store_codecs.py on the demo store (256 short documents), 2.67 B/token against 4.18 for version 2's
# Arrow IPC file with Zstd-compressed buffers (each buffer compressed alone, behind its own headers, plus the
# schema twice) and 3.06 for Parquet, which also decodes about 25x slower (the nested segment lists). Plain
# pyarrow reads it: `pa.ipc.open_stream(pa.input_stream(path, compression="zstd")).read_all()`. The `fast` and
# `none` presets store the stream in raw (uncompressed) Zstd blocks (`zstd_raw_frame`): the same file, read the
# same way by any Zstd decoder, at memory-copy speed (Zstd's entropy decoding of the text, about 1 GB/s, would
# cost more than all the lz4hc arrays).
INDEX_ZSTD_LEVEL = 19
INDEX_ZSTD_LEVELS: dict[str, int | None] = {"small": INDEX_ZSTD_LEVEL, "fast": None, "none": None}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_RAW_BLOCK_BYTES = 1 << 17  # Zstd's largest block (128 KiB)


def index_file(format_version: int) -> str:
    """The index file name of a shard of this format version."""
    return INDEX_FILE if format_version >= 3 else INDEX_FILE_V2


def index_to_bytes(table: pa.Table, compression: str = DEFAULT_COMPRESSION) -> bytes:
    """A shard index as the bytes of `index.arrows.zst` (an Arrow IPC stream in one Zstd frame)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    level = INDEX_ZSTD_LEVELS[check_compression(compression)]
    if level is None:
        return zstd_raw_frame(memoryview(sink.getvalue()))
    codec = pa.Codec("zstd", compression_level=level)
    return codec.compress(sink.getvalue(), asbytes=True)


def zstd_raw_frame(data: bytes | memoryview) -> bytes:
    """`data` as one Zstd frame of raw (stored) blocks (RFC 8878 §3.1.1): any Zstd decoder reads it back, at the
    speed of a memory copy. The frame records its content size (8 bytes) and a 128 KiB window (the block size),
    so streaming decoders need no more memory than that."""
    data = memoryview(data).cast("B")
    # descriptor 0xC0: 8-byte content size, not single-segment, no checksum, no dictionary; window 2**17 (0x38)
    parts = [ZSTD_MAGIC, b"\xc0\x38", len(data).to_bytes(8, "little")]
    starts = range(0, len(data), ZSTD_RAW_BLOCK_BYTES)
    if not starts:
        parts.append((1).to_bytes(3, "little"))  # one empty last block
    for start in starts:
        block = data[start : start + ZSTD_RAW_BLOCK_BYTES]
        last = start + len(block) >= len(data)
        # block header: bit 0 last block, bits 1-2 type (0 = raw), bits 3-23 size
        parts += [(int(last) | len(block) << 3).to_bytes(3, "little"), block]
    return b"".join(parts)


def zstd_content_size(head: bytes) -> int | None:
    """The decompressed size a Zstd frame header records (RFC 8878 §3.1.1.1), or None when it records none.

    Args:
        head: the first bytes of the frame (18 suffice: magic, descriptor, window, dictionary id, size).
    """
    if len(head) < 5 or head[:4] != ZSTD_MAGIC:
        return None
    descriptor = head[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    num_bytes = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if num_bytes == 0 or len(head) < offset + num_bytes:
        return None
    value = int.from_bytes(head[offset : offset + num_bytes], "little")
    return value + 256 if num_bytes == 2 else value


def index_from_bytes(data: bytes | pa.Buffer, format_version: int = FORMAT_VERSION) -> pa.Table:
    """Read a shard index from its file's bytes (any readable format version).

    Raises:
        pyarrow.ArrowInvalid, OSError: the bytes are not an index of that version.
    """
    if format_version >= 3:
        size = zstd_content_size(memoryview(data)[:18].tobytes())
        if size is not None:  # one-shot decompression into a buffer of the right size: 25% faster
            raw = pa.Codec("zstd").decompress(data, decompressed_size=size)
        else:
            raw = pa.CompressedInputStream(pa.BufferReader(data), "zstd").read_buffer()
        return pa.ipc.open_stream(raw).read_all()
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round float16/float32 values to `keep_bits` mantissa bits (nearest, ties away from zero).

    Non-finite values (NaN, ±inf) are kept as they are. The result has the input's dtype; its low mantissa bits are
    zero, which is what lets the shuffling compressors store it in fewer bytes.
    """
    values = np.ascontiguousarray(values)
    mantissa_bits = {np.dtype(np.float16): 10, np.dtype(np.float32): 23}[values.dtype]
    drop = mantissa_bits - int(keep_bits)
    if drop <= 0:
        return values.copy()
    uint = np.uint16 if values.dtype == np.float16 else np.uint32
    bits = values.view(uint)
    half = uint(1 << (drop - 1))
    mask = uint(~((1 << drop) - 1) & (0xFFFF if uint is np.uint16 else 0xFFFFFFFF))
    rounded = ((bits + half) & mask).view(values.dtype)
    return np.where(np.isfinite(values), rounded, values)
