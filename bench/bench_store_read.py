"""Store read throughput vs a NumPy memmap of the same arrays, and bytes per token on disk (DESIGN.md targets).

    .venv/bin/python bench/bench_store_read.py [--tokens 2000000] [--shards 4] [--repeat 5]
        [--store STORE] [--compression small,fast,none] [--threads 1,0]

Writes the same sequences once per `compression` preset (`docs/store.md`) into a temporary folder, at
`precision: compact` (what `alm precompute` writes by default): random values by default (sequences of 64-1024
tokens, log-softmax-like `logp`, float16 boundary log-masses from a Dirichlet, 4 random printable text bytes per
token: less compressible than a real teacher's, so sizes are an upper bound and zstd decodes slower than on real
text), or, with `--store`, every sequence of a real store (shards as they are there). Then times, best of
`--repeat`, reading every shard back:

- `shard arrays only`: the three default arrays of each shard (`alm.store.reader.read_shard_arrays`), no index;
- `iter_shards`: `alm.open_store(path).iter_shards()` (index + all default arrays, whole shards, every file
  checked against its CRC-32C);
- `iter_sequences`: the same plus a `StoredSequence` view per sequence (float16 -> float32 once per shard);
- baseline: the same arrays saved as `.npy` files per shard, read through `np.load(mmap_mode="r")` and copied into
  memory, one shard at a time like `iter_shards` (page cache warm in both cases; the baseline reads no index).

Each store figure is run at each `--threads` count (0 = the default, `alm.store.reader.read_threads()`; 1 = no
threads; threads decode the index and the arrays' chunks at once). Prints one line per figure: the ratio is
baseline time / store time (throughput relative to the memmap; target >= 0.5x), with the memmap measured
before every figure and the fastest memmap time used throughout (so the ratios are conservative on a shared
machine), then bytes per token on disk per preset. Wall-clock time: CPU time is no measure here (the sandboxed
development machine does not count the kernel's share of file reads and page faults). Blosc decodes on this
process's threads only (`--threads`; numcodecs' own pool is set to one thread here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import alm  # noqa: E402
from alm.store import schema  # noqa: E402
from alm.store.finalize import finalize_store  # noqa: E402
from alm.store.inspect import inspect_stats  # noqa: E402
from alm.store.reader import read_shard_arrays as read_arrays  # noqa: E402
from alm.store.reader import read_threads  # noqa: E402
from alm.store.writer import ShardWriter, StorePlan, prepare_store  # noqa: E402

FIELDS = ["token_id", "logp", "boundary_logmass"]


def build_store(
    path: Path,
    num_tokens: int,
    num_shards: int,
    seed: int = 0,
    compression: str = schema.DEFAULT_COMPRESSION,
) -> None:
    """A store of random sequences at `path` (the same sequences for the same seed, whatever the preset)."""
    rng = np.random.default_rng(seed)
    plan = StorePlan(
        teacher_model="bench",
        tokenizer_fingerprint="bench",
        data_spec_name="bench",
        data_spec_fingerprint="bench",
        num_shards=num_shards,
        max_length=1024,
        precision="compact",  # what `alm precompute` writes by default
        compression=compression,
    )
    layout = prepare_store(path, plan, overwrite=True)
    per_shard = num_tokens // num_shards
    seq_id = 0
    for j in range(num_shards):
        with ShardWriter(layout, j) as writer:
            written = 0
            while written < per_shard:
                n = int(min(rng.integers(64, 1025), per_shard - written))
                token_id = rng.integers(0, 49152, n).astype(np.int32)
                logp = -rng.exponential(2.0, n).astype(np.float32)
                logp[0] = np.nan
                bm = np.log(rng.dirichlet(np.ones(6), n)[:, :5]).astype(np.float16)
                text = rng.integers(32, 127, 4 * n).astype(np.uint8).tobytes()
                writer.add(
                    seq_id=seq_id,
                    text=text,
                    token_id=token_id,
                    logp=logp,
                    boundary_logmass=bm,
                    segments=[
                        {
                            "role": "text",
                            "start_byte": 0,
                            "end_byte": len(text),
                            "start_pos": 0,
                            "end_pos": n,
                        }
                    ],
                    loss_spans=[(0, len(text))],
                    doc_id=f"d{seq_id}",
                    source="bench",
                    row=seq_id,
                )
                written += n
                seq_id += 1
    finalize_store(path)


def copy_store(source: Path, path: Path, compression: str) -> None:
    """Every sequence of the store at `source`, rewritten at `path` (precision compact, the same shards)."""
    from bench_store_codecs import rewrite_store

    rewrite_store(alm.open_store(source), path, "compact", compression)


def best_of(fn: Callable[[], object], repeat: int, clock: Callable[[], float]) -> float:
    fn()  # warm the page cache and imports
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--store", type=Path, help="read the sequences of this store instead")
    parser.add_argument("--compression", default=",".join(schema.COMPRESSIONS))
    parser.add_argument("--threads", default="1,0", help="0 = alm's default (read_threads())")
    args = parser.parse_args()
    clock = time.perf_counter
    from numcodecs import blosc  # pyright: ignore[reportAttributeAccessIssue]

    blosc.set_nthreads(1)  # decoding threads are counted by --threads alone
    presets = args.compression.split(",")
    thread_counts = [int(t) or read_threads() for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="alm-bench-store-") as tmp:
        stores = {}
        for preset in presets:
            stores[preset] = Path(tmp) / f"store-{preset}"
            if args.store is not None:
                copy_store(args.store, stores[preset], preset)
            else:
                build_store(stores[preset], args.tokens, args.shards, compression=preset)
        # the baseline: the arrays as .npy files, one set per shard
        npy_dir = Path(tmp) / "npy"
        npy_dir.mkdir()
        first = alm.open_store(stores[presets[0]])
        shard_ids = list(first.shard_indices)
        for j in shard_ids:
            for name, a in first.read_shard(j, FIELDS).arrays.items():
                np.save(npy_dir / f"{j}-{name}.npy", a)

        def read_memmap() -> int:
            # shard by shard, holding one shard's arrays at once, exactly like iter_shards
            total = 0
            for j in shard_ids:
                arrays = {
                    name: np.array(np.load(npy_dir / f"{j}-{name}.npy", mmap_mode="r"))
                    for name in FIELDS
                }
                total += arrays["token_id"].nbytes
            return total

        memmap_times = []
        results = []
        for preset, path in stores.items():
            for threads in thread_counts:

                def read_shard_arrays(path=path, threads=threads) -> int:
                    store = alm.open_store(path)
                    return sum(
                        read_arrays(store.location, schema.shard_path(j), FIELDS, threads=threads)[
                            "token_id"
                        ].nbytes
                        for j in store.shard_indices
                    )

                def read_shards(path=path, threads=threads) -> int:
                    return sum(
                        s.arrays["token_id"].nbytes
                        for s in alm.open_store(path).iter_shards(FIELDS, threads=threads)
                    )

                def read_sequences(path=path, threads=threads) -> int:
                    return sum(
                        seq.num_tokens
                        for shard in alm.open_store(path).iter_shards(FIELDS, threads=threads)
                        for seq in shard.sequences()
                    )

                for label, fn in (
                    ("shard arrays only (no index)", read_shard_arrays),
                    ("iter_shards (arrays + index)", read_shards),
                    ("iter_sequences", read_sequences),
                ):
                    memmap_times.append(best_of(read_memmap, args.repeat, clock))
                    results.append((preset, threads, label, best_of(fn, args.repeat, clock)))
        t_memmap = min(memmap_times)
        stats = inspect_stats(stores[presets[0]])
        n = stats["num_tokens"]
        source = str(args.store) if args.store is not None else "random values"
        print(
            f"store ({source}): {n:,} tokens, {stats['num_sequences']:,} sequences, {len(shard_ids)} shards; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"memmap baseline: {n / t_memmap / 1e6:.1f} M tokens/s (fastest of {len(memmap_times)}; slowest "
            f"{n / max(memmap_times) / 1e6:.1f})"
        )
        for preset, threads, label, t in results:
            print(
                f"{preset:>5}, {threads} thread(s): {label} vs memmap: {t_memmap / t:.2f}x "
                f"({n / t / 1e6:.1f} M tokens/s)"
            )
        for preset, path in stores.items():
            stats = inspect_stats(path)
            print(
                f"{preset:>5}: bytes/token on disk, default fields {stats['bytes_per_token_default_fields']:.2f}, "
                f"whole store (with index and text) {stats['bytes_per_token_total']:.2f}"
            )


if __name__ == "__main__":
    main()
