"""Per-field codec measurement on a real teacher store: bytes per token and decode speed of each candidate.

    .venv/bin/python bench/bench_store_codecs.py STORE [--repeat 5] [--rewrite]

Reads every shard of STORE (any format version alm reads), then, per shard and per field, encodes the field's
bytes with each candidate codec that Zarr v3 ships (Blosc with zstd / lz4 / lz4hc and no, byte or bit shuffle at
the store's 1 MiB Blosc blocks, plain Zstd), the per-sequence index with each Arrow IPC / Parquet / one-frame
option, and prints one table row per (field, codec): bytes per teacher token (summed over shards, so per-shard
fixed costs count), decode throughput relative to a copy of the uncompressed bytes (the memmap baseline of
`bench/bench_store_read.py`) and in GB/s of decoded bytes, best of `--repeat`, on one thread. The codec each
`compression` preset picks (`alm.store.schema.ARRAY_CODECS`, `INDEX_ZSTD_LEVELS`) is marked `<- preset`. Lossy
rows (`mantissa m`) round the field's mantissa to m bits before the codec, which is how `precision: compact` (the
default) stores them (`docs/store.md`).

With `--rewrite`, STORE is also rewritten with this code's format (version 3) at `precision: exact` and at
`compact` with each `compression` preset into a temporary folder, and the all-in bytes per teacher token of each
are printed (arrays, index with the text and every JSON file; the fixed vocabulary files aside), against STORE's
own.

The machine may be shared: read the decode columns as ratios within this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import alm  # noqa: E402
from alm.store import schema  # noqa: E402
from alm.store.finalize import finalize_store  # noqa: E402
from alm.store.writer import ShardWriter, StorePlan, prepare_store  # noqa: E402


def rewrite_store(
    source: alm.TeacherStore,
    target: Path,
    precision: str,
    compression: str = schema.DEFAULT_COMPRESSION,
) -> None:
    """Copy every sequence of `source` into a new store at `target`, written by this code at `precision` with the
    `compression` preset."""
    plan = StorePlan.from_json(source.manifest.plan)
    plan = dataclasses.replace(plan, precision=precision, compression=compression)
    layout = prepare_store(target, plan)
    for j in source.shard_indices:
        shard = source.read_shard(j)
        with ShardWriter(layout, j) as writer:
            for seq in shard.sequences():
                writer.add(
                    seq_id=seq.seq_id,
                    text=seq.text,
                    token_id=seq.token_id,
                    logp=seq.logp,
                    boundary_logmass=seq.boundary_logmass,
                    segments=seq.segments,
                    loss_spans=seq.loss_spans,
                    truncated=seq.truncated,
                    doc_id=seq.doc_id,
                    source=seq.source,
                    row=seq.row,
                    topk_id=seq.topk_id,
                    topk_logp=seq.topk_logp,
                    hidden=seq.hidden,
                )
    finalize_store(target)


def all_in_bytes(path: Path) -> int:
    """Bytes on disk of a store folder without its fixed vocabulary files (`vocab/`)."""
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and schema.VOCAB_DIR not in p.relative_to(path).parts[:1]
    )


def round_mantissa(values: np.ndarray, keep_bits: int) -> np.ndarray:
    """Round floats to `keep_bits` mantissa bits (nearest, ties away), as `schema.round_mantissa` does."""
    return schema.round_mantissa(values, keep_bits)


def candidates() -> dict[str, Callable[[], numcodecs.abc.Codec | None]]:
    """Every codec tried per field: Zarr's plain `zstd` and its `blosc` with each inner codec and shuffle, at the
    store's Blosc block size."""
    out: dict[str, Callable[[], numcodecs.abc.Codec | None]] = {"none": lambda: None}
    for level in (3, 9, 19):
        out[f"zstd {level}"] = lambda level=level: numcodecs.Zstd(level=level)
    levels = {"lz4": (5,), "lz4hc": (9,), "zstd": (1, 3, 5, 7, 9)}
    for cname, clevels in levels.items():
        for shuffle, label in (
            (numcodecs.Blosc.NOSHUFFLE, "noshuffle"),
            (numcodecs.Blosc.SHUFFLE, "shuffle"),
            (numcodecs.Blosc.BITSHUFFLE, "bitshuffle"),
        ):
            for clevel in clevels:
                out[f"blosc {cname} {clevel} {label}"] = (
                    lambda cname=cname, clevel=clevel, shuffle=shuffle: numcodecs.Blosc(
                        cname=cname,
                        clevel=clevel,
                        shuffle=shuffle,
                        blocksize=schema.BLOSC_BLOCKSIZE,
                    )
                )
    return out


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


Row = tuple[str, str, float, float, float]  # field, codec, bytes/token, decode x copy, decode GB/s


def measure_arrays(shards: list[dict[str, np.ndarray]], num_tokens: int, repeat: int) -> list[Row]:
    numcodecs.blosc.set_nthreads(
        1
    )  # one core per reader process; ratios stay comparable across codecs
    rows = []
    for name in schema.DEFAULT_FIELDS:
        chosen: dict[str, str] = {}
        for preset in schema.COMPRESSIONS:
            label = schema.codec_label(name, preset)
            chosen[label] = f"{chosen[label]}, {preset}" if label in chosen else preset
        variants: list[tuple[str, list[np.ndarray]]] = [("exact", [s[name] for s in shards])]
        bits = schema.PRECISION_MANTISSA_BITS["compact"].get(name)
        if bits is not None:
            variants.append((f"mantissa {bits}", [round_mantissa(s[name], bits) for s in shards]))
        for variant, arrays in variants:
            raw = [np.ascontiguousarray(a).tobytes() for a in arrays]
            t_copy = best_of(lambda raw=raw: [bytearray(r) for r in raw], repeat)
            raw_bytes = sum(len(r) for r in raw)
            for label, make in candidates().items():
                codec = make()
                if codec is None:
                    encoded = raw
                    t_decode = t_copy
                else:
                    encoded = [codec.encode(np.frombuffer(r, dtype=arrays[0].dtype)) for r in raw]
                    outs = [bytearray(len(r)) for r in raw]
                    t_decode = best_of(
                        lambda codec=codec, encoded=encoded, outs=outs: [
                            codec.decode(e, out=o) for e, o in zip(encoded, outs)
                        ],
                        repeat,
                    )
                size = sum(len(e) for e in encoded)
                # the compact presets' choice is marked with the preset's name
                mark = chosen.get(label, "") if variant != "exact" or bits is None else ""
                rows.append(
                    (
                        f"{name} ({variant})",
                        f"{label}{' <- ' + mark if mark else ''}",
                        size / num_tokens,
                        t_copy / t_decode,
                        raw_bytes / t_decode / 1e9,
                    )
                )
    return rows


def _default_specs() -> dict[str, schema.FieldSpec]:
    return schema.field_specs(schema.DEFAULT_FIELDS)


def measure_index(indexes: list[pa.Table], num_tokens: int, repeat: int) -> list[Row]:
    """Bytes per token and read time (bytes to table) of each way to store the shard indexes."""
    rows = []
    streams = [_stream(t) for t in indexes]
    raw_bytes = sum(len(r) for r in streams)
    t_copy = best_of(lambda: [bytearray(r) for r in streams], repeat)

    def zstd_frame(level: int) -> Callable[[pa.Table], bytes]:
        return lambda t: pa.Codec("zstd", compression_level=level).compress(
            _stream(t), asbytes=True
        )

    options: list[tuple[str, Callable[[pa.Table], bytes], Callable[[bytes], object]]] = [
        ("arrow ipc file, uncompressed", lambda t: _ipc(t, None), _read_ipc_file),
        ("arrow ipc file, lz4 buffers", lambda t: _ipc(t, "lz4"), _read_ipc_file),
        ("arrow ipc file, zstd buffers (v2)", lambda t: _ipc(t, "zstd"), _read_ipc_file),
        ("parquet, zstd", lambda t: _parquet(t, compression="zstd"), _read_parquet),
        (
            "parquet, zstd 9, tuned",
            lambda t: _parquet(
                t,
                compression="zstd",
                compression_level=9,
                use_dictionary=False,
                write_statistics=False,
                store_schema=False,
                column_encoding=dict.fromkeys(
                    ["seq_id", "row", "token_start", "token_end", "num_tokens", "num_bytes"],
                    "DELTA_BINARY_PACKED",
                ),
            ),
            _read_parquet,
        ),
        (
            "arrow ipc stream, one lz4 frame",
            lambda t: pa.Codec("lz4").compress(_stream(t), asbytes=True),
            lambda b: _read_frame(b, "lz4"),
        ),
    ]
    for level in (1, 3, 9, -5):
        options.append((f"arrow ipc stream, one zstd {level} frame", zstd_frame(level), _read_zstd))
    for preset in schema.COMPRESSIONS:
        if preset == "none":
            continue  # the same bytes as `fast`
        level = schema.INDEX_ZSTD_LEVELS[preset]
        options.append(
            (
                f"arrow ipc stream, {'raw' if level is None else f'zstd {level}'} frame <- {preset}",
                lambda t, preset=preset: schema.index_to_bytes(t, preset),
                _read_zstd,
            )
        )
    for label, write, read in options:
        encoded = [write(t) for t in indexes]
        t_read = best_of(lambda encoded=encoded, read=read: [read(e) for e in encoded], repeat)
        size = sum(len(e) for e in encoded)
        rows.append(
            (
                "index (text included)",
                label,
                size / num_tokens,
                t_copy / t_read,
                raw_bytes / t_read / 1e9,
            )
        )
    text = sum(sum(len(t) for t in table.column("text").to_pylist()) for table in indexes)
    rows.append(("index: raw text bytes alone", "-", text / num_tokens, math.nan, math.nan))
    rows.append(("index: raw arrow ipc stream", "-", raw_bytes / num_tokens, math.nan, math.nan))
    return rows


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _read_zstd(data: bytes) -> pa.Table:
    return schema.index_from_bytes(data)


def _read_frame(data: bytes, codec: str) -> pa.Table:
    raw = pa.CompressedInputStream(pa.BufferReader(data), codec).read_buffer()
    return pa.ipc.open_stream(raw).read_all()


def _read_ipc_file(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(data)).read_all()


def _read_parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


def _parquet(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def _ipc(table: pa.Table, compression: str | None) -> bytes:
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--rewrite", action="store_true", help="also rewrite STORE at each precision"
    )
    args = parser.parse_args()
    store = alm.open_store(args.store)
    shards = [store.read_shard(j) for j in store.shard_indices]
    arrays = [s.arrays for s in shards]
    num_tokens = sum(s.num_tokens for s in shards)
    print(
        f"store {args.store}: format version {store.manifest.format_version}, {len(shards)} shards, "
        f"{num_tokens:,} tokens, {store.num_sequences:,} sequences (decode: x a copy of the raw bytes)"
    )
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'field':<32} {'codec':<44} {'B/token':>8} {'decode':>8} {'GB/s':>6}")
    for field, label, bpt, speed, gbps in measure_arrays(
        arrays, num_tokens, args.repeat
    ) + measure_index([s.index for s in shards], num_tokens, args.repeat):
        print(f"{field:<32} {label:<44} {bpt:8.2f} {speed:7.2f}x {gbps:6.2f}")
    print(
        f"all in (arrays, index, JSON; vocab aside), {args.store} as it is (format version "
        f"{store.format_version}): {all_in_bytes(args.store) / num_tokens:.2f} bytes/token"
    )
    if args.rewrite:
        variants = [("exact", schema.DEFAULT_COMPRESSION)]
        variants += [("compact", preset) for preset in schema.COMPRESSIONS]
        for precision, compression in variants:
            with tempfile.TemporaryDirectory(prefix="alm-codecs-") as tmp:
                target = Path(tmp) / "store"
                rewrite_store(store, target, precision, compression)
                sizes = {
                    "arrays": sum(
                        p.stat().st_size for p in target.rglob("arrays/*/c/**/*") if p.is_file()
                    ),
                    "index": sum(p.stat().st_size for p in target.rglob(schema.INDEX_FILE)),
                    "JSON": sum(p.stat().st_size for p in target.rglob("*.json")),
                }
                parts = ", ".join(f"{k} {v / num_tokens:.2f}" for k, v in sizes.items())
                print(
                    f"all in, rewritten as format version {schema.FORMAT_VERSION} precision={precision} "
                    f"compression={compression}: "
                    f"{all_in_bytes(target) / num_tokens:.2f} bytes/token ({parts})"
                )


if __name__ == "__main__":
    main()
