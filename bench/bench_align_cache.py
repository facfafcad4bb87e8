"""Stage-two data path with an alignment cache (`alm align`) against aligning on the fly, in one run.

    .venv/bin/python bench/bench_align_cache.py [--documents 256] [--document-bytes 2048] [--max-length 1024] [--repeat 3]

Builds in-process a tiny random teacher (two-layer Llama, byte-level BPE of 512 tokens trained on stdlib text),
precomputes a store of `--documents` plain documents of about `--document-bytes` bytes (stdlib docstrings and
comments joined, read through a `text` data spec) with it, truncated at `--max-length` teacher tokens, writes the
alignment cache for each student (the byte tokenizer with the teacher's specials, the most chunks per text; a
byte-level BPE of 700 tokens), then times `MicroBatches[k]` for every micro-batch of one epoch (whole-shard store
reads with checksums, student examples, collation; one process, as one DataLoader worker) with the cache and
without it. Best of `--repeat`; each pass starts with empty shard caches.

Prints one line per student: seconds per epoch both ways, ms per sequence, text MB/s, and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import yaml
from factories import bpe_tokenizer, corpus_texts, tiny_llama

from alm.config.train import StoreRef
from alm.store.reader import open_store
from alm.train.alignments import builder_for, find_cache, write_alignments
from alm.train.loader import MicroBatches, open_training_stores

REPO = Path(__file__).resolve().parents[1]


def precompute_store(root: Path, documents: int, document_bytes: int, max_length: int) -> Path:
    from alm.precompute import run_precompute

    teacher = root / "teacher"
    tokenizer = bpe_tokenizer(512)
    tiny_llama(len(tokenizer), seed=7, hidden=32).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    student = root / "student"
    bpe_tokenizer(700).save_pretrained(student)
    texts = root / "texts"
    texts.mkdir()
    pieces, size, count = [], 0, 0
    for text in corpus_texts(20 * documents, seed=1):
        pieces.append(text)
        size += len(text.encode())
        if size >= document_bytes:
            (texts / f"doc-{count:05d}.txt").write_text("\n\n".join(pieces))
            pieces, size, count = [], 0, count + 1
            if count == documents:
                break
    spec = {
        "name": "bench_docs",
        "split": "all",
        "sources": [
            {"type": "text", "name": "docs", "path": str(texts), "glob": "*.txt", "unit": "file"}
        ],
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    recipe = {
        "teacher": {"model": str(teacher), "backend": "hf", "device": "cpu", "dtype": "float32"},
        "data": {"spec": str(root / "spec.yaml")},
        "output": str(root / "store"),
        "max_length": max_length,
        "token_budget": 8192,
        "shard_size": 64,
    }
    (root / "pre.yaml").write_text(yaml.safe_dump(recipe))
    run_precompute(root / "pre.yaml", shard="0/1")
    return root / "store"


def epoch_seconds(dataset: MicroBatches, num_batches: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        dataset._shards.clear()
        for cache in dataset.alignment_caches:
            if cache is not None:
                cache._shards.clear()
        start = time.perf_counter()
        for k in range(num_batches):
            dataset[k]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--document-bytes", type=int, default=2048)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store_path = str(
            precompute_store(root, args.documents, args.document_bytes, args.max_length)
        )
        store = open_store(store_path)
        stores = open_training_stores([StoreRef(path=store_path)])
        text_bytes = int(store.manifest.num_text_bytes)
        num_sequences = store.num_sequences
        num_batches = num_sequences // args.batch
        print(
            f"store: {num_sequences} sequences, {store.num_tokens} teacher tokens, {text_bytes} text bytes "
            f"({text_bytes / num_sequences:.0f} B/sequence); {num_batches} micro-batches of {args.batch}"
        )
        for name, student in (("bytes", "bytes"), ("bpe-700", str(root / "student"))):
            builder = builder_for(store, student=student, max_length=4 * args.max_length)
            start = time.perf_counter()
            write_alignments(store_path, builder)
            align_seconds = time.perf_counter() - start
            cache = find_cache(StoreRef(path=store_path), builder, with_hidden=False)
            assert cache is not None
            times = {}
            for label, caches in (("on the fly", [None]), ("cached", [cache])):
                dataset = MicroBatches(
                    stores, builder, micro_batch_size=args.batch, seed=0, alignment_caches=caches
                )
                times[label] = epoch_seconds(dataset, num_batches, args.repeat)
            seqs = num_batches * args.batch
            line = [f"student {name}: alm align {align_seconds:.2f} s once;"]
            for label, seconds in times.items():
                line.append(
                    f"{label} {seconds:.3f} s/epoch ({1e3 * seconds / seqs:.3f} ms/seq, "
                    f"{text_bytes * seqs / num_sequences / seconds / 1e6:.2f} MB text/s);"
                )
            line.append(f"speed-up {times['on the fly'] / times['cached']:.2f}x")
            print(" ".join(line))


if __name__ == "__main__":
    main()
