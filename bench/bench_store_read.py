"""Store read throughput vs a NumPy memmap of the same arrays, and bytes per token on disk (DESIGN.md targets).

    .venv/bin/python bench/bench_store_read.py [--tokens 2000000] [--shards 4] [--repeat 5]

Builds a realistic store in a temporary folder (sequences of 64-1024 tokens, real log-softmax-like values,
float16 boundary log-masses), then times, best of `--repeat`, reading every shard back:

- `iter_shards`: `alm.open_store(path).iter_shards()` (index + all default arrays, whole shards);
- `iter_sequences`: the same plus a `StoredSequence` view per sequence (float16 -> float32 once per shard);
- baseline: the same arrays saved as `.npy` files per shard, read through `np.load(mmap_mode="r")` and copied
  into memory (page cache warm in both cases).

Prints one line per figure: the ratio is baseline time / store time (throughput relative to memmap; target
>= 0.5x), and the bytes per token of the default fields on disk. The values are random (less compressible than a
real teacher's), so the sizes here are an upper bound; `bench/bench_store_codecs.py` measures real stores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import alm
from alm.store.finalize import finalize_store
from alm.store.inspect import inspect_stats
from alm.store.reader import read_shard_arrays as read_arrays
from alm.store.writer import ShardWriter, StorePlan, prepare_store


def build_store(
    path: Path, num_tokens: int, num_shards: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    plan = StorePlan(
        teacher_model="bench",
        tokenizer_fingerprint="bench",
        data_spec_name="bench",
        data_spec_fingerprint="bench",
        num_shards=num_shards,
        max_length=1024,
        precision="compact",  # what `alm precompute` writes by default
    )
    layout = prepare_store(path, plan, overwrite=True)
    per_shard = num_tokens // num_shards
    flat = []
    seq_id = 0
    for j in range(num_shards):
        arrays: dict[str, list[np.ndarray]] = {"token_id": [], "logp": [], "boundary_logmass": []}
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
                for name, a in (("token_id", token_id), ("logp", logp), ("boundary_logmass", bm)):
                    arrays[name].append(a)
                written += n
                seq_id += 1
        flat.append({name: np.concatenate(parts) for name, parts in arrays.items()})
    finalize_store(path)
    return flat


def best_of(fn, repeat: int) -> float:
    fn()  # warm the page cache and imports
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alm-bench-store-") as tmp:
        store_path = Path(tmp) / "store"
        flat = build_store(store_path, args.tokens, args.shards)
        npy_dir = Path(tmp) / "npy"
        npy_dir.mkdir()
        for j, arrays in enumerate(flat):
            for name, a in arrays.items():
                np.save(npy_dir / f"{j}-{name}.npy", a)

        def read_memmap() -> int:
            # shard by shard, holding one shard's arrays at once, exactly like iter_shards
            total = 0
            for j in range(args.shards):
                arrays = {
                    name: np.array(np.load(npy_dir / f"{j}-{name}.npy", mmap_mode="r"))
                    for name in ("token_id", "logp", "boundary_logmass")
                }
                total += arrays["token_id"].nbytes
            return total

        def read_shard_arrays() -> int:
            store = alm.open_store(store_path)
            return sum(
                read_arrays(
                    store.location,
                    f"shards/shard-{j:05d}",
                    ["token_id", "logp", "boundary_logmass"],
                )["token_id"].nbytes
                for j in store.shard_indices
            )

        def read_shards() -> int:
            return sum(
                s.arrays["token_id"].nbytes for s in alm.open_store(store_path).iter_shards()
            )

        def read_sequences() -> int:
            return sum(seq.num_tokens for seq in alm.open_store(store_path).iter_sequences())

        t_memmap = best_of(read_memmap, args.repeat)
        t_arrays = best_of(read_shard_arrays, args.repeat)
        t_shards = best_of(read_shards, args.repeat)
        t_sequences = best_of(read_sequences, args.repeat)
        stats = inspect_stats(store_path)
        n = stats["num_tokens"]
        print(f"store: {n:,} tokens, {stats['num_sequences']:,} sequences, {args.shards} shards")
        print(f"memmap baseline: {n / t_memmap / 1e6:.1f} M tokens/s")
        print(
            f"shard arrays only (no index) vs memmap: {t_memmap / t_arrays:.2f}x ({n / t_arrays / 1e6:.1f} M tokens/s)"
        )
        print(
            f"iter_shards (arrays + index) vs memmap: {t_memmap / t_shards:.2f}x ({n / t_shards / 1e6:.1f} M tokens/s; target >= 0.5x)"
        )
        print(
            f"iter_sequences vs memmap: {t_memmap / t_sequences:.2f}x "
            f"({n / t_sequences / 1e6:.1f} M tokens/s, {stats['num_sequences'] / t_sequences:,.0f} sequences/s)"
        )
        print(f"bytes/token on disk, default fields: {stats['bytes_per_token_default_fields']:.2f}")
        print(
            f"bytes/token on disk, whole store (with index and text): {stats['bytes_per_token_total']:.2f}"
        )


if __name__ == "__main__":
    main()
