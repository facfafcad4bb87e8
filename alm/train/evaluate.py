"""Held-out evaluation: student bits per byte, chunk agreement with the teacher, the teacher's own BPB.

DESIGN.md "Measuring quality": bits per byte (BPB) is comparable across tokenizers,

    BPB = sum of token NLL over positions >= 1 / (content bytes x ln 2),

computed for the student on its own tokenization of the stored texts and for the teacher from the stored
`logp` (no teacher model needed). Chunk agreement is the mean over greedy in-loss chunks of
|log p_T(chunk) - log p_S(chunk)| (no debiasing, no merging: the plain chunk likelihoods of §1).

The per-batch figures are `alm.eval.score`'s (`next_token_logp`, `chunk_abs_logp_diff`), the code `alm eval`
uses; the convention differs from `alm eval`'s bits per byte (docs/evaluation.md "In-training evaluation").

Evaluation sequences are split across ranks (sequence i goes to rank i mod world size) and the sums are
all-reduced, so every process gets the same figures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from alm.config.train import TrainRecipe
from alm.eval.score import chunk_abs_logp_diff, next_token_logp
from alm.losses.alm import logp_of_token, next_token_ids
from alm.store.reader import open_store
from alm.train import parallel
from alm.train.batch import StudentBatch, StudentExampleBuilder, collate


def eval_batches(
    store_path: str,
    builder: StudentExampleBuilder,
    batch_size: int,
    rank: int,
    world_size: int,
    max_sequences: int | None,
) -> Iterator[StudentBatch]:
    """This rank's share of the held-out store, in stored order, collated in batches."""
    pending: list[Any] = []  # stored sequences of the next batch
    for i, seq in enumerate(
        open_store(store_path).iter_sequences(["token_id", "logp", "boundary_logmass"])
    ):
        if max_sequences is not None and i >= max_sequences:
            break
        if i % world_size != rank:
            continue
        pending.append(seq)
        if len(pending) == batch_size:
            yield collate([example for example, _ in builder.build_many(pending)])
            pending = []
    if pending:
        yield collate([example for example, _ in builder.build_many(pending)])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterator[StudentBatch],
    device: torch.device,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Student BPB, teacher BPB and chunk agreement over `batches` (built with `with_eval=True`).

    Args:
        model: the `TrainModule` (wrapped or not); called as `model(input_ids, attention_mask)`.
        batches: collated held-out batches.
        device: where the model lives.
        all_reduce_sum: sums a tensor over processes (`alm.train.parallel.all_reduce_sum`).
        autocast: context for the forward pass.
        vocab_size: real student vocabulary size.

    Returns:
        `eval/student_bpb`, `eval/teacher_bpb`, `eval/chunk_abs_logp_diff`, `eval/num_sequences`.
    """
    was_training = model.training
    model.eval()
    # student NLL, teacher NLL, teacher bytes, |diff| sum, chunks, sequences, student bytes
    totals = torch.zeros(7, dtype=torch.float64)
    for batch in batches:
        figures = batch.eval
        assert figures is not None, "evaluation batches are built with with_eval=True"
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        with autocast():
            logits, _ = model(input_ids, attention_mask)
        next_logp = next_token_logp(
            logits, next_token_ids(input_ids, keep=attention_mask), vocab_size=vocab_size
        )  # [B, Ts] float64, 0 where no target
        diff_sum = chunk_abs_logp_diff(
            logp_of_token(next_logp, fill=0.0),
            figures.chunk_student_start.to(device),
            figures.chunk_student_end.to(device),
            figures.chunk_teacher_logp.to(device),
            figures.chunk_mask.to(device),
        ).sum()
        totals += torch.stack(
            [
                -next_logp.sum().cpu(),
                -figures.teacher_logp_sum.double().sum(),
                figures.num_bytes.double().sum(),
                diff_sum.cpu(),
                figures.chunk_mask.sum().double(),
                torch.tensor(float(input_ids.shape[0]), dtype=torch.float64),
                figures.student_num_bytes.double().sum(),
            ]
        )
    totals = all_reduce_sum(totals.to(device)).cpu()
    model.train(was_training)
    student_nll, teacher_nll, num_bytes, diff_sum, num_chunks, num_sequences, student_bytes = (
        totals.tolist()
    )
    return {
        # Each side over the bytes its own tokens cover (the student may be truncated earlier).
        "eval/student_bpb": student_nll / (max(student_bytes, 1.0) * math.log(2)),
        "eval/teacher_bpb": teacher_nll / (max(num_bytes, 1.0) * math.log(2)),
        "eval/chunk_abs_logp_diff": diff_sum / max(num_chunks, 1.0),
        "eval/num_sequences": num_sequences,
    }


def evaluate_store(
    model: nn.Module,
    cfg: TrainRecipe,
    builder: StudentExampleBuilder,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    vocab_size: int,
) -> dict[str, float] | None:
    """The recipe's held-out evaluation (`evaluate` over this rank's share of `cfg.eval.store`), or None without
    an `eval` section. Every process takes part (the sums are all-reduced)."""
    if cfg.eval is None:
        return None
    batches = eval_batches(
        cfg.eval.store,
        builder,
        cfg.optim.micro_batch_size,
        parallel.rank(),
        parallel.world_size(),
        cfg.eval.max_sequences,
    )
    progress = tqdm(
        batches,
        desc="eval",
        unit="batch",
        leave=False,
        disable=not parallel.is_main(),
        mininterval=1.0,
    )
    return evaluate(model, iter(progress), device, parallel.all_reduce_sum, autocast, vocab_size)
