"""`alm verify`'s store check and `alm train --dry-run`'s file check: time, and how often each file is read.

    .venv/bin/python bench/bench_verify.py [--tokens 400000] [--shards 4] [--repeat 5]

Builds the store of `bench/bench_store_read.py` (random values, `precision: compact`, the default fields) in a
temporary folder, then, best of `--repeat` with the page cache warm:

- `verify_store(path)`: every file and checksum and every value (the store layer of `alm verify`);
- `check_store_files(path)`: files and checksums only (`alm train --dry-run`).

For each it prints the time, the throughput, and the bytes read from the store's files against the bytes the
store holds (an audit hook counts every `open` of a store file for reading, plus Arrow's memory maps of the
index; each file is read whole, so reads x size is the traffic). "read each file once" means a ratio of 1.00x.
Then, interleaved in one process (so the machine's load cancels in the ratio), the time of the second read the
code did before each file was read once (every shard file read and checked again through a fresh check, the page
cache warm) against a whole run of each: the before/after time ratio. Run it on the older commit too for the
bytes-read figure of the old code.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store_read import build_store

from alm.store._fs import locate
from alm.store.finalize import finalize_store
from alm.store.verify import check_store_files, verify_store
from alm.store.writer import StoreLayout, read_plan


def add_vocab_table(store: Path, vocab_size: int = 49152) -> None:
    """A vocabulary table of the bench store's size (ids only; `verify` checks ids against its length), and the
    manifest written again to list it."""
    location = locate(store)
    table = pa.table({"id": pa.array(range(vocab_size), pa.int32())}).replace_schema_metadata(
        {"fingerprint": "bench"}
    )
    StoreLayout(location, read_plan(location)).write_vocab(table)
    finalize_store(store)


def _count_reads(root: str) -> collections.Counter[str]:
    """Count, per store file, every open for reading from now on (audit hook + `pyarrow.memory_map`)."""
    counts: collections.Counter[str] = collections.Counter()

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str) or not args[0].startswith(root):
            return
        mode = args[1] if len(args) > 1 else "r"
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(mode, int) and mode & (os.O_WRONLY | os.O_RDWR)
        )
        if not writing and os.path.isfile(args[0]):
            counts[os.path.relpath(args[0], root)] += 1

    sys.addaudithook(hook)
    memory_map = pa.memory_map

    def counted_memory_map(path, *args, **kwargs):
        if str(path).startswith(root):
            counts[os.path.relpath(path, root)] += 1
        return memory_map(path, *args, **kwargs)

    pa.memory_map = counted_memory_map
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="alm-bench-verify-") as tmp:
        store = Path(tmp) / "store"
        build_store(store, args.tokens, args.shards)
        add_vocab_table(store)
        root = str(store.resolve())
        sizes = {
            os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root)
            for f in files
        }
        counts = _count_reads(root)
        for label, run in (
            ("verify_store (files, checksums, values)", lambda: verify_store(store)),
            ("check_store_files (dry-run)", lambda: check_store_files(store)),
        ):
            report = run()  # warm the page cache and imports
            # random float16 masses can round past a sum of 1 (value problems); files and checksums are sound
            assert report.ok or all("boundary_logmass" in p for p in report.problems), (
                report.summary()
            )
            counts.clear()
            run()
            read = sum(sizes[rel] * n for rel, n in counts.items())
            held = sum(sizes.values())
            twice = sum(1 for n in counts.values() if n > 1)
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            best = min(times)
            print(
                f"{label}: {best * 1e3:.1f} ms, {report.num_tokens / best / 1e6:.1f} M tokens/s; read "
                f"{read:,} bytes of {held:,} in the store ({read / held:.2f}x), {len(counts)} files, "
                f"{twice} read more than once"
            )
        compare_in_process(store, 3 * args.repeat)


def second_read(store_path: Path) -> None:
    """What `verify_store` did before reading each file once, beyond what it does now: every file of every shard
    read and checked again through a fresh `ShardCheck` (page cache warm)."""
    from alm.store.reader import open_store

    store = open_store(store_path)
    for j in store.shard_indices:
        check = store.shard_check(j)
        for rel in sorted(check.files or ()):
            check.read(store.location, rel)


def compare_in_process(store: Path, repeat: int) -> None:
    """The saved second read against a whole `verify_store` / `check_store_files`, interleaved in one process
    (min over `repeat` rounds), so the machine's load cancels in the ratio."""
    times: dict[str, list[float]] = {"verify": [], "dry": [], "second": []}
    for _ in range(repeat):
        for key, fn in (
            ("verify", lambda: verify_store(store)),
            ("dry", lambda: check_store_files(store)),
            ("second", lambda: second_read(store)),
        ):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    verify, dry, second = (min(times[k]) for k in ("verify", "dry", "second"))
    print(
        f"in one process, min of {repeat} interleaved rounds: the second read the old code did costs "
        f"{second * 1e3:.1f} ms; verify_store before/after {(verify + second) / verify:.2f}x "
        f"({verify * 1e3:.1f} ms now), check_store_files before/after {(dry + second) / dry:.2f}x "
        f"({dry * 1e3:.1f} ms now)"
    )


if __name__ == "__main__":
    main()
