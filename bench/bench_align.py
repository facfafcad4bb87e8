"""Alignment + target building + collation throughput against tokenizing the same text (DESIGN.md target ≥ 1×).

    .venv/bin/python bench/bench_align.py [--documents 64] [--document-bytes 4096] [--batch 16] [--repeat 3]

Teacher: SmolLM2-135M-Instruct's tokenizer. Students: the pure byte tokenizer (the most chunks per text, worst
case) and a byte-level BPE trained in-process. Texts: real stdlib docstrings/comments joined into plain documents
of about `--document-bytes` bytes (a 4 KB document is ~1k SmolLM2 tokens, the paper's sequence scale).

Timed, best of `--repeat`, over all documents in micro-batches of `--batch`:

- ours: `align_sequences` + `build_alm_targets` + `pad_targets` for every example, from the already rendered
  teacher and student sequences (per-token offsets and roles);
- baseline: the student's fast tokenizer on the same texts, one batch call per micro-batch
  (`tokenizer(texts, add_special_tokens=False)`, single-threaded like a DataLoader worker).

Prints one line per student: ratio = baseline time / our time (throughput relative to tokenizing; target ≥ 1×).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import bpe_tokenizer, byte_tokenizer, corpus_texts, smollm2_tokenizer

from alm.align import align_sequences, build_alm_targets
from alm.losses.batch import pad_targets
from alm.templates import plain_document, render
from alm.vocab import vocab_from_tokenizer


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def align_batches(batches, teachers, students, teacher_logp, teacher_boundary) -> int:
    num_groups = 0
    for batch in batches:
        targets = []
        for i in batch:
            chunks = align_sequences(teachers[i], students[i], teachers[i].loss_spans)
            targets.append(build_alm_targets(chunks, teacher_logp[i], teacher_boundary[i]))
        num_groups += int(pad_targets(targets).num_groups)
    return num_groups


def tokenize_batches(batches, tokenizer, texts) -> None:
    for batch in batches:
        tokenizer([texts[i] for i in batch], add_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument(
        "--document-bytes", type=int, default=4096, help="join corpus texts up to this size"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    texts, current = [], ""
    for text in corpus_texts(args.documents * args.document_bytes // 64, seed=7):
        current = f"{current}\n\n{text}" if current else text
        if len(current.encode()) >= args.document_bytes:
            texts.append(current)
            current = ""
        if len(texts) == args.documents:
            break
    documents = [plain_document(f"d{i}", "bench", i, t.encode()) for i, t in enumerate(texts)]
    teacher_tok = smollm2_tokenizer()
    teacher_vocab = vocab_from_tokenizer(teacher_tok)
    teachers = [render(d, teacher_tok, teacher_vocab) for d in documents]
    rng = np.random.default_rng(0)
    teacher_logp = [np.concatenate([[np.nan], -rng.exponential(2.0, len(t) - 1)]) for t in teachers]
    teacher_boundary = [np.log(rng.uniform(0.01, 1.0, len(t))) for t in teachers]
    num_bytes = sum(len(t.text) for t in teachers)

    for name, student_tok in (("bytes", byte_tokenizer()), ("bpe-512", bpe_tokenizer())):
        student_vocab = vocab_from_tokenizer(student_tok)
        students = [render(d, student_tok, student_vocab) for d in documents]
        batches = [
            range(i, min(i + args.batch, len(documents)))
            for i in range(0, len(documents), args.batch)
        ]
        ours = functools.partial(
            align_batches, batches, teachers, students, teacher_logp, teacher_boundary
        )
        baseline = functools.partial(tokenize_batches, batches, student_tok, texts)
        ours_s = best_of(args.repeat, ours)
        num_groups = ours()
        baseline_s = best_of(args.repeat, baseline)
        num_student_tokens = sum(len(s) for s in students)
        print(
            f"align+targets+collate vs student tokenizer ({name} student, SmolLM2 teacher): "
            f"{baseline_s / ours_s:.2f}x  (ours {num_bytes / ours_s / 1e6:.2f} MB/s, "
            f"tokenizer {num_bytes / baseline_s / 1e6:.2f} MB/s; {len(documents)} docs, {num_bytes} bytes, "
            f"{num_student_tokens} student tokens, {num_groups} groups)"
        )


if __name__ == "__main__":
    main()
