"""Per-field codec measurement on a real teacher store: bytes per token and decode speed of each candidate.

    .venv/bin/python bench/bench_store_codecs.py STORE [--repeat 5] [--rewrite]

Reads every shard of STORE (any format version alm reads), then, per shard and per field, encodes the field's
bytes with each candidate codec that Zarr v3 ships (Blosc with zstd / lz4 and byte or bit shuffle, plain Zstd),
the per-sequence index with each Arrow IPC / Parquet option, and prints one table row per (field, codec):
bytes per teacher token (summed over shards, so per-shard fixed costs count) and decode throughput relative to a
copy of the uncompressed bytes (the memmap baseline of `bench/bench_store_read.py`), best of `--repeat`. The
store's own choice (`alm.store.schema`) is marked `*`. Lossy rows (`mantissa m`) round the field's mantissa to m
bits before the codec, which is how `store.precision: compact` stores them (`docs/store.md`).

With `--rewrite`, STORE is also rewritten with this code's format (version 2) at each precision (`exact`,
`compact`) into a temporary folder, and the all-in bytes per teacher token of each are printed (arrays, index with
the text and every JSON file; the fixed vocabulary files aside), against STORE's own.

The machine may be shared: read the decode column as a ratio within this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
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


def rewrite_store(source: alm.TeacherStore, target: Path, precision: str) -> None:
    """Copy every sequence of `source` into a new store at `target`, written by this code at `precision`."""
    plan = StorePlan.from_json(source.manifest.plan)
    plan = dataclasses.replace(plan, precision=precision)
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


def candidates(typesize: int) -> dict[str, Callable[[], numcodecs.abc.Codec | None]]:
    out: dict[str, Callable[[], numcodecs.abc.Codec | None]] = {"none": lambda: None}
    for level in (3, 9, 19):
        out[f"zstd {level}"] = lambda level=level: numcodecs.Zstd(level=level)
    for cname in ("lz4", "zstd"):
        for shuffle, label in (
            (numcodecs.Blosc.NOSHUFFLE, "noshuffle"),
            (numcodecs.Blosc.SHUFFLE, "shuffle"),
            (numcodecs.Blosc.BITSHUFFLE, "bitshuffle"),
        ):
            for clevel in (5, 7, 9) if cname == "zstd" else (5,):
                out[f"blosc {cname} {clevel} {label}"] = (
                    lambda cname=cname, clevel=clevel, shuffle=shuffle: numcodecs.Blosc(
                        cname=cname, clevel=clevel, shuffle=shuffle, blocksize=0
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


def measure_arrays(
    shards: list[dict[str, np.ndarray]], num_tokens: int, repeat: int
) -> list[tuple[str, str, float, float]]:
    numcodecs.blosc.set_nthreads(
        1
    )  # one core per reader process; ratios stay comparable across codecs
    rows = []
    chosen = {name: schema.codec_label(spec.dtype) for name, spec in _default_specs().items()}
    for name in schema.DEFAULT_FIELDS:
        variants: list[tuple[str, list[np.ndarray]]] = [("exact", [s[name] for s in shards])]
        if name == "logp":
            variants += [
                (f"mantissa {m}", [round_mantissa(s[name], m) for s in shards]) for m in (16, 12)
            ]
        if name == "boundary_logmass":
            variants += [
                (f"mantissa {m}", [round_mantissa(s[name], m) for s in shards]) for m in (7, 5)
            ]
        for variant, arrays in variants:
            raw = [np.ascontiguousarray(a).tobytes() for a in arrays]
            t_copy = best_of(lambda raw=raw: [bytearray(r) for r in raw], repeat)
            typesize = arrays[0].dtype.itemsize
            for label, make in candidates(typesize).items():
                codec = make()
                if codec is None:
                    encoded = raw
                    t_decode = t_copy
                else:
                    if isinstance(codec, numcodecs.Blosc):
                        codec = numcodecs.Blosc(
                            cname=codec.cname,
                            clevel=codec.clevel,
                            shuffle=codec.shuffle,
                            blocksize=0,
                        )
                    encoded = [codec.encode(np.frombuffer(r, dtype=arrays[0].dtype)) for r in raw]
                    t_decode = best_of(
                        lambda codec=codec, encoded=encoded: [codec.decode(e) for e in encoded],
                        repeat,
                    )
                size = sum(len(e) for e in encoded)
                mark = "*" if variant == "exact" and label == chosen[name] else " "
                rows.append(
                    (f"{name} ({variant})", f"{mark}{label}", size / num_tokens, t_copy / t_decode)
                )
    return rows


def _default_specs() -> dict[str, schema.FieldSpec]:
    return schema.field_specs(schema.DEFAULT_FIELDS)


def measure_index(indexes: list[pa.Table], num_tokens: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for label, write in (
        ("arrow ipc, uncompressed", lambda t, s: _ipc(t, s, None)),
        ("arrow ipc, lz4", lambda t, s: _ipc(t, s, "lz4")),
        ("arrow ipc, zstd", lambda t, s: _ipc(t, s, "zstd")),
        ("parquet, zstd", lambda t, s: pq.write_table(t, s, compression="zstd")),
        (
            "parquet, zstd 9, tuned",
            lambda t, s: pq.write_table(
                t,
                s,
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
        ),
        ("*arrow ipc, zstd 9 (alm)", lambda t, s: s.write(schema.index_to_bytes(t))),
    ):
        size = 0
        for table in indexes:
            sink = io.BytesIO()
            write(table, sink)
            size += len(sink.getvalue())
        rows.append(("index (text included)", label, size / num_tokens, float("nan")))
    text = sum(sum(len(t) for t in table.column("text").to_pylist()) for table in indexes)
    rows.append(("index: raw text bytes alone", "-", text / num_tokens, float("nan")))
    return rows


def _ipc(table: pa.Table, sink: io.BytesIO, compression: str | None) -> None:
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)


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
    print(f"{'field':<32} {'codec':<28} {'B/token':>8} {'decode':>8}")
    for field, label, bpt, speed in measure_arrays(arrays, num_tokens, args.repeat) + measure_index(
        [s.index for s in shards], num_tokens
    ):
        print(f"{field:<32} {label:<28} {bpt:8.2f} {speed:7.2f}x")
    print(
        f"all in (arrays, index, JSON; vocab aside), {args.store} as it is (format version "
        f"{store.format_version}): {all_in_bytes(args.store) / num_tokens:.2f} bytes/token"
    )
    if args.rewrite:
        for precision in schema.PRECISIONS:
            with tempfile.TemporaryDirectory(prefix="alm-codecs-") as tmp:
                target = Path(tmp) / "store"
                rewrite_store(store, target, precision)
                sizes = {
                    "arrays": sum(
                        p.stat().st_size for p in target.rglob("arrays/*/c/**/*") if p.is_file()
                    ),
                    "index": sum(p.stat().st_size for p in target.rglob(schema.INDEX_FILE)),
                    "JSON": sum(p.stat().st_size for p in target.rglob("*.json")),
                }
                parts = ", ".join(f"{k} {v / num_tokens:.2f}" for k, v in sizes.items())
                print(
                    f"all in, rewritten as format version {schema.FORMAT_VERSION} precision={precision}: "
                    f"{all_in_bytes(target) / num_tokens:.2f} bytes/token ({parts})"
                )


if __name__ == "__main__":
    main()
