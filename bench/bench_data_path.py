"""Stage two's data path per worker process: `StudentExampleBuilder` + `collate`, student tokenization included.

    .venv/bin/python bench/bench_data_path.py [--seconds 3] [--batch 16] [--gpu-student-tokens-per-s 66000]
        [--profile bytes-docs] [--against /tmp/base]

Teacher: SmolLM2-135M-Instruct's tokenizer (real), with random teacher values (the cost does not depend on them).
Students: the pure byte tokenizer and a byte-level BPE (2,048 tokens) trained in-process. Workloads (issue 11,
target 3):

- `docs`: plain documents of about 2 KB (stdlib docstrings joined); target >= 2 MB of text per second per worker;
- `chat`: short chatml turns (a user question and an assistant answer of a few dozen bytes each, the shape of
  SFT/chat data); target <= 0.3 ms per sequence (the fixed cost dominates).

Each line gives text MB/s, sequences/s, ms per sequence, student tokens/s, and how many DataLoader workers feed a
GPU step that consumes `--gpu-student-tokens-per-s` student tokens per second (default: a 1B student on one H200 at
~40% MFU, 0.4 * 989 TFLOP/s / (6 * 1e9 FLOP/token) ~= 66k tokens/s). `--profile NAME` (e.g. `bytes-docs`) prints
the cProfile top 25 of that case.

`--against PATH` times, in the same process, the data path of another checkout too (e.g. `git worktree add
/tmp/base main`; its `alm` package is imported under another name), pass by pass alternating with this
checkout's, and prints the CPU-time ratio before/after per case: on a shared machine only such ratios mean much.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import math
import os
import pstats
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from factories import bpe_tokenizer, byte_tokenizer, corpus_texts, smollm2_tokenizer

from alm.store.reader import StoredSequence
from alm.templates import Document, chat_document, plain_document, render
from alm.train.batch import StudentExampleBuilder, collate
from alm.vocab import vocab_from_tokenizer

MAX_LENGTH = 4096


def documents(num_docs: int, doc_bytes: int) -> list[Document]:
    texts, current = [], ""
    for text in corpus_texts(num_docs * doc_bytes // 48, seed=11):
        current = f"{current}\n\n{text}" if current else text
        if len(current.encode()) >= doc_bytes:
            texts.append(current[: doc_bytes + 200])
            current = ""
        if len(texts) == num_docs:
            break
    return [plain_document(f"d{i}", "bench", i, t.encode()) for i, t in enumerate(texts)]


def chats(num_chats: int) -> list[Document]:
    pieces = [t for t in corpus_texts(4 * num_chats, seed=12) if 20 <= len(t) <= 400]
    out = []
    for i in range(num_chats):
        question = pieces[(2 * i) % len(pieces)][:48].encode()
        answer = pieces[(2 * i + 1) % len(pieces)][:80].encode()
        out.append(chat_document(f"c{i}", "bench", i, [("user", question), ("assistant", answer)]))
    return out


def stored(teacher_tok, teacher_vocab, docs: list[Document]) -> list[StoredSequence]:
    rng = np.random.default_rng(0)
    out = []
    for i, doc in enumerate(docs):
        seq = render(doc, teacher_tok, teacher_vocab, "chatml", MAX_LENGTH)
        n = len(seq.token_id)
        logp = -rng.exponential(2.0, size=n).astype(np.float32)
        logp[0] = np.nan
        boundary = np.log(rng.dirichlet(np.ones(6), size=n)[:, :5]).astype(np.float32)
        out.append(
            StoredSequence(
                i,
                doc.doc_id,
                doc.source,
                doc.row,
                0,
                seq.text,
                seq.segments,
                seq.loss_spans,
                seq.truncated,
                seq.token_id,
                logp,
                boundary,
            )
        )
    return out


def run(builder: StudentExampleBuilder, sequences: list[StoredSequence], batch: int) -> int:
    student_tokens = 0
    for i in range(0, len(sequences), batch):
        out = collate(build(builder, sequences[i : i + batch]))
        student_tokens += int(out.attention_mask.sum())
    return student_tokens


def build(builder: Any, sequences: list[StoredSequence]) -> list[Any]:
    """One micro-batch's examples: `build_many` where the checkout has it (one tokenizer call), else one by one."""
    if hasattr(builder, "build_many"):
        return [example for example, _ in builder.build_many(sequences)]
    return [builder(s) for s in sequences]


def import_checkout(path: str) -> tuple[Any, Any]:
    """The `alm.vocab` and `alm.train.batch` modules of the checkout at `path`, imported as `alm_base`."""
    target = Path(tempfile.mkdtemp(prefix="alm-base-")) / "alm_base"
    for source in (Path(path) / "alm").rglob("*.py"):
        text = re.sub(r"\balm\.(?=[a-z_])", "alm_base.", source.read_text())
        text = re.sub(r"^(from|import) alm\b(?!_)", r"\1 alm_base", text, flags=re.M)
        out = target / source.relative_to(Path(path) / "alm")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("alm_base.vocab"), importlib.import_module(
        "alm_base.train.batch"
    )


def compare(builders, sequences: list[StoredSequence], batch: int, seconds: float) -> list[float]:
    """CPU seconds per pass of each (builder, collate) pair, passes alternating (the order flips each round)."""
    spent = [0.0] * len(builders)
    rounds = 0
    for builder, collate_fn in builders:  # warm caches
        for i in range(0, len(sequences), batch):
            collate_fn(build(builder, sequences[i : i + batch]))
    while rounds < 2 or sum(spent) < seconds * len(builders):
        order = range(len(builders)) if rounds % 2 == 0 else reversed(range(len(builders)))
        for k in order:
            builder, collate_fn = builders[k]
            start = time.process_time()
            for i in range(0, len(sequences), batch):
                collate_fn(build(builder, sequences[i : i + batch]))
            spent[k] += time.process_time() - start
        rounds += 1
    return [t / rounds for t in spent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time each case at least this long"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gpu-student-tokens-per-s", type=float, default=66_000.0)
    parser.add_argument("--profile", help="print the cProfile top 25 of this case, e.g. bytes-docs")
    parser.add_argument(
        "--against", help="another alm checkout to time in the same run (before/after ratios)"
    )
    args = parser.parse_args()
    base = import_checkout(args.against) if args.against else None

    teacher_tok = smollm2_tokenizer()
    teacher_vocab = vocab_from_tokenizer(teacher_tok)
    workloads = {
        "docs": stored(teacher_tok, teacher_vocab, documents(48, 2048)),
        "chat": stored(teacher_tok, teacher_vocab, chats(384)),
    }
    for student_name, student_tok in (("bytes", byte_tokenizer()), ("bpe", bpe_tokenizer(2048))):
        settings = {
            "student_tokenizer": student_tok,
            "student_family": "chatml",
            "max_length": MAX_LENGTH,
            "boundary_class_ids": [0, 1, 2, 4],
            "gamma": 0.1,
        }
        builder = StudentExampleBuilder(
            teacher_vocab=teacher_vocab, student_vocab=vocab_from_tokenizer(student_tok), **settings
        )
        for workload, sequences in workloads.items():
            name = f"{student_name}-{workload}"
            if base is not None:
                base_vocab, base_batch = base
                base_builder = base_batch.StudentExampleBuilder(
                    teacher_vocab=base_vocab.vocab_from_tokenizer(teacher_tok),
                    student_vocab=base_vocab.vocab_from_tokenizer(student_tok),
                    **settings,
                )
                before, after = compare(
                    [(base_builder, base_batch.collate), (builder, collate)],
                    sequences,
                    args.batch,
                    args.seconds,
                )
                num_bytes = sum(len(s.text) for s in sequences)
                print(
                    f"before/after {name:11s}: {before / after:5.2f}x  CPU ms/seq "
                    f"{1e3 * before / len(sequences):6.3f} -> {1e3 * after / len(sequences):6.3f}  "
                    f"CPU MB/s {num_bytes / before / 1e6:6.2f} -> {num_bytes / after / 1e6:6.2f}  "
                    f"(load average {os.getloadavg()[0]:.1f})"
                )
                continue
            run(builder, sequences, args.batch)  # warm caches
            if args.profile == name:
                profiler = cProfile.Profile()
                profiler.enable()
                run(builder, sequences, args.batch)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            rounds, tokens = 0, 0
            start = time.perf_counter()
            while True:
                tokens += run(builder, sequences, args.batch)
                rounds += 1
                elapsed = time.perf_counter() - start
                if elapsed >= args.seconds:
                    break
            num_seqs = rounds * len(sequences)
            num_bytes = rounds * sum(len(s.text) for s in sequences)
            tokens_per_s = tokens / elapsed
            workers = math.ceil(args.gpu_student_tokens_per_s / tokens_per_s)
            print(
                f"data path {name:11s}: {num_bytes / elapsed / 1e6:6.2f} MB/s  {num_seqs / elapsed:8.0f} seq/s  "
                f"{1e3 * elapsed / num_seqs:6.3f} ms/seq  {tokens_per_s:9.0f} student tok/s  "
                f"workers for {args.gpu_student_tokens_per_s:.0f} tok/s: {workers}  "
                f"({len(sequences)} seqs, {sum(len(s.text) for s in sequences) / len(sequences):.0f} B/seq)"
            )


if __name__ == "__main__":
    main()
