"""Training step time with the ALM loss vs the SFT loss (same student, same batch), and data-path throughput.

    .venv/bin/python bench/bench_train_step.py [--hidden 256] [--layers 4] [--batch 4] [--steps 8] [--store DIR]

Prints one line per figure:

- `train step ALM / SFT`: median optimizer-step time (forward, loss, backward, AdamW) with `loss.kind=alm`
  against `loss.kind=sft`; target <= 1.10x (DESIGN.md performance targets).
- `data path / step consumption`: sequences per second that one DataLoader worker builds (student rendering,
  alignment, ALM targets, collation) against sequences per second that the ALM step consumes; >= 1x means one
  worker keeps the step fed.

The student is a random Llama with a byte-level BPE vocabulary; the teacher side is a real rendering with another
tokenizer and random teacher values (the cost of the data path does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
import torch
from factories import bpe_tokenizer, corpus_texts, tiny_llama

from alm.store.reader import StoredSequence
from alm.templates import plain_document, render
from alm.train.batch import StudentExampleBuilder, collate
from alm.train.step import LossSettings, StepCounts, TrainModule, micro_batch_loss
from alm.vocab import vocab_from_tokenizer


def stored_sequences(teacher_tok, texts: list[str], max_length: int) -> list[StoredSequence]:
    vocab = vocab_from_tokenizer(teacher_tok)
    rng = np.random.default_rng(0)
    out = []
    for i, text in enumerate(texts):
        seq = render(
            plain_document(f"d{i}", "bench", i, text.encode()), teacher_tok, vocab, None, max_length
        )
        n = len(seq.token_id)
        logp = -rng.exponential(2.0, size=n).astype(np.float32)
        logp[0] = np.nan
        boundary = np.log(rng.dirichlet(np.ones(6), size=n)[:, :5]).astype(np.float32)
        out.append(
            StoredSequence(
                0,
                f"d{i}",
                "bench",
                i,
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--store", help="a teacher store: also time the loader's whole-shard reads on it"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher_tok, student_tok = bpe_tokenizer(512), bpe_tokenizer(2048)
    student_vocab = vocab_from_tokenizer(student_tok)
    texts = [t for t in corpus_texts(400) if len(t) > 600][: 4 * args.batch]
    stored = stored_sequences(teacher_tok, texts, args.length)
    builder = StudentExampleBuilder(
        teacher_vocab=vocab_from_tokenizer(teacher_tok),
        student_tokenizer=student_tok,
        student_vocab=student_vocab,
        student_family="auto",
        max_length=args.length,
        boundary_class_ids=[0, 1, 2, 4],
        gamma=0.1,
    )

    # Data path: examples built and collated per second (one process = one worker).
    start = time.perf_counter()
    rounds = 0
    while time.perf_counter() - start < 3.0:
        for i in range(0, len(stored), args.batch):
            # what a DataLoader worker does per micro-batch (`MicroBatches`)
            collate([example for example, _ in builder.build_many(stored[i : i + args.batch])])
        rounds += 1
    data_seq_per_s = rounds * len(stored) / (time.perf_counter() - start)

    store_seq_per_s = None
    if args.store:
        from alm.config.train import StoreRef
        from alm.store.reader import open_store
        from alm.train.loader import MicroBatches, open_training_stores

        store_builder = StudentExampleBuilder(
            teacher_vocab=open_store(args.store).vocab,
            student_tokenizer=student_tok,
            student_vocab=student_vocab,
            student_family="auto",
            max_length=args.length,
            boundary_class_ids=[0, 1, 2, 4],
            gamma=0.1,
        )
        loader = MicroBatches(
            open_training_stores([StoreRef(path=args.store)]),
            store_builder,
            micro_batch_size=args.batch,
            seed=0,
        )
        num_batches = max(1, loader.order.epoch_size // args.batch)
        start = time.perf_counter()
        for k in range(num_batches):
            loader[k]
        store_seq_per_s = num_batches * args.batch / (time.perf_counter() - start)

    batch = collate([builder(s) for s in stored[: args.batch]])
    vocab_size = len(student_vocab.token_bytes)
    boundary_mask = torch.as_tensor(student_vocab.boundary_mask([0, 1, 2, 4]))
    counts = StepCounts(batch.targets.num_groups, batch.num_sft_tokens, torch.tensor(1))
    times: dict[str, list[float]] = {"alm": [], "sft": []}
    models = {}
    for kind in times:
        module = TrainModule(
            tiny_llama(vocab_size, seed=0, hidden=args.hidden, layers=args.layers).train()
        )
        models[kind] = (
            module,
            torch.optim.AdamW(module.parameters(), lr=1e-4),
            LossSettings((kind,), 100.0, "binary_ce", 0.0, "gradmag"),
        )
    for step in range(args.steps + 2):
        for kind in times:  # interleaved, so machine noise hits both alike
            module, optimizer, settings = models[kind]
            t0 = time.perf_counter()
            loss, _ = micro_batch_loss(
                module,
                batch,
                settings,
                boundary_mask,
                counts,
                vocab_size,
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up steps excluded
                times[kind].append(time.perf_counter() - t0)
    alm_s, sft_s = statistics.median(times["alm"]), statistics.median(times["sft"])
    step_seq_per_s = args.batch / alm_s
    print(
        f"train step ALM / SFT: {alm_s / sft_s:.3f}x (ALM {alm_s * 1e3:.1f} ms, SFT {sft_s * 1e3:.1f} ms; "
        f"batch {args.batch} x {batch.input_ids.shape[1]} tokens, vocab {vocab_size}, hidden {args.hidden}, "
        f"{args.layers} layers; target <= 1.10x)"
    )
    print(
        f"data path / step consumption: {data_seq_per_s / step_seq_per_s:.2f}x (one worker builds "
        f"{data_seq_per_s:.0f} seq/s, the ALM step consumes {step_seq_per_s:.1f} seq/s; target >= 1x)"
    )
    if store_seq_per_s is not None:
        print(
            f"loader from store / step consumption: {store_seq_per_s / step_seq_per_s:.2f}x (one worker "
            f"reads shards and builds {store_seq_per_s:.0f} seq/s from {args.store}; target >= 1x)"
        )


if __name__ == "__main__":
    main()
