"""What one student micro-batch is, and how it is built from stored teacher sequences (DESIGN.md stage two,
ALM_SPEC §3-§5, §7).

Owns `StudentExample` (one sequence, NumPy), `StudentBatch` (a padded micro-batch, torch: every field the losses
and the evaluation read, in one definition), `EvalTargets`, `StudentExampleBuilder` and `collate`.

Per stored sequence, on CPU (in DataLoader workers), `StudentExampleBuilder`:

1. rebuilds the teacher's token sequence from the stored ids and segments (`alm.templates.sequence_from_ids`);
2. re-renders the same abstract segments with the student's tokenizer and template family
   (`document_from_stored` + `render`, truncated to the student's `max_length`);
3. aligns the two on byte offsets (`alm.align.align_sequences`, with the stored loss spans);
4. combines the stored boundary classes into the teacher's boundary log-mass (logsumexp over the chosen classes)
   and builds the ALM targets (`alm.align.build_alm_targets`: chunk sums, gamma-merging, debiasing);
5. adds the student's SFT loss mask (`alm.templates.token_in_loss`, the one loss-region rule), for the hidden-state loss the teacher hidden states at the last token of
   each greedy chunk, and for evaluation the greedy chunks' teacher log-probs.

`collate` pads a micro-batch: the ALM targets through `alm.losses.batch.pad_targets` (the loss's own typed input),
the rest here. Never decodes text to `str`. Never imports torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alm.align import Chunks, align_sequences
from alm.align.targets import (
    AlmTargets,
    build_alm_targets,
    chunk_logp_sums,
    combine_boundary_classes,
)
from alm.losses.batch import PaddedTargets, pad_targets
from alm.templates import document_from_stored, render, sequence_from_ids, token_in_loss
from alm.vocab import Vocab


@dataclass(frozen=True)
class EvalExample:
    """Held-out figures of one sequence (E = greedy in-loss chunks).

    Attributes:
        chunk_teacher_logp: float32 [E], the teacher's log-prob of each greedy in-loss chunk (no debiasing).
        chunk_student_start, chunk_student_end: int64 [E], the chunk's student token range.
        num_bytes: the text's length in bytes (the teacher's BPB denominator).
        student_num_bytes: bytes the student's (possibly truncated) tokens cover.
        teacher_logp_sum: float64, Σ of the stored teacher log-probs over positions ≥ 1.
    """

    chunk_teacher_logp: np.ndarray
    chunk_student_start: np.ndarray
    chunk_student_end: np.ndarray
    num_bytes: int
    student_num_bytes: int
    teacher_logp_sum: float


@dataclass(frozen=True)
class StudentExample:
    """One stored sequence seen by the student (Ts = student tokens, C = greedy chunks, d_T = teacher width).

    Attributes:
        input_ids: int64 [Ts], the student's tokens.
        sft_mask: bool [Ts], the tokens SFT trains on (never position 0).
        targets: the ALM targets (groups and greedy chunks).
        hidden_teacher: float32 [C, d_T], the teacher's hidden state at each greedy chunk's last token, or None.
        eval: held-out figures, or None outside evaluation.
    """

    input_ids: np.ndarray
    sft_mask: np.ndarray
    targets: AlmTargets
    hidden_teacher: np.ndarray | None = None
    eval: EvalExample | None = None


@dataclass(frozen=True)
class EvalTargets:
    """`EvalExample`s padded (E = most chunks, at least 1): padded chunks are the empty token range [1, 1).

    Attributes:
        chunk_teacher_logp: float32 [B, E]; chunk_mask: bool [B, E]; chunk_student_start/_end: int64 [B, E];
        num_bytes, student_num_bytes: int64 [B]; teacher_logp_sum: float64 [B].
    """

    chunk_teacher_logp: torch.Tensor
    chunk_mask: torch.Tensor
    chunk_student_start: torch.Tensor
    chunk_student_end: torch.Tensor
    num_bytes: torch.Tensor
    student_num_bytes: torch.Tensor
    teacher_logp_sum: torch.Tensor


@dataclass(frozen=True)
class StudentBatch:
    """One micro-batch, right-padded: everything `alm.train.step` and `alm.train.evaluate` read.

    Attributes:
        input_ids: int64 [B, Ts] (0 where padded); attention_mask: bool [B, Ts].
        sft_mask: bool [B, Ts], SFT targets; num_sft_tokens: int64 scalar, their count.
        targets: the ALM targets (`PaddedTargets`: groups [B, G], greedy chunks [B, C], counts).
        hidden_teacher: float32 [B, C, d_T] aligned with `targets.chunk_mask`, or None.
        eval: padded held-out figures, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sft_mask: torch.Tensor
    num_sft_tokens: torch.Tensor
    targets: PaddedTargets
    hidden_teacher: torch.Tensor | None = None
    eval: EvalTargets | None = None

    def to(self, device: torch.device) -> StudentBatch:
        """The tensors the model side reads, on `device` (evaluation figures stay where they are)."""
        return StudentBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            sft_mask=self.sft_mask.to(device),
            num_sft_tokens=self.num_sft_tokens.to(device),
            targets=self.targets.to(device),
            hidden_teacher=None if self.hidden_teacher is None else self.hidden_teacher.to(device),
            eval=self.eval,
        )


class StudentExampleBuilder:
    """Callable that turns a `StoredSequence` into a `StudentExample` (picklable for DataLoader workers)."""

    def __init__(
        self,
        *,
        teacher_vocab: Vocab,
        student_tokenizer: Any,
        student_vocab: Vocab,
        student_family: str,
        max_length: int,
        boundary_class_ids: Sequence[int],
        gamma: float,
        debias: bool = True,
        with_hidden: bool = False,
        with_eval: bool = False,
    ) -> None:
        self.teacher_vocab = teacher_vocab
        self.student_tokenizer = student_tokenizer
        self.student_vocab = student_vocab
        self.student_family = student_family
        self.max_length = max_length
        self.boundary_class_ids = tuple(boundary_class_ids)
        self.gamma = gamma
        self.debias = debias
        self.with_hidden = with_hidden
        self.with_eval = with_eval

    def for_evaluation(self) -> StudentExampleBuilder:
        """The same builder for held-out evaluation: with the evaluation figures, without hidden states."""
        return StudentExampleBuilder(
            teacher_vocab=self.teacher_vocab,
            student_tokenizer=self.student_tokenizer,
            student_vocab=self.student_vocab,
            student_family=self.student_family,
            max_length=self.max_length,
            boundary_class_ids=self.boundary_class_ids,
            gamma=self.gamma,
            debias=self.debias,
            with_eval=True,
        )

    def __call__(self, seq: Any) -> StudentExample:
        return self.build(seq)[0]

    def build(self, seq: Any) -> tuple[StudentExample, Chunks]:
        """The example and every aligned greedy chunk behind it (in the loss or not; `alm align` caches both)."""
        teacher = sequence_from_ids(seq, self.teacher_vocab)
        student = render(
            document_from_stored(seq),
            self.student_tokenizer,
            self.student_vocab,
            self.student_family,
            max_length=self.max_length,
        )
        loss_spans = np.asarray(seq.loss_spans, dtype=np.int64).reshape(-1, 2)
        chunks_all = align_sequences(teacher, student, loss_spans, keep_outside_loss=True)
        teacher_logmass = combine_boundary_classes(
            np.asarray(seq.boundary_logmass), self.boundary_class_ids
        )
        targets = build_alm_targets(
            chunks_all,
            np.asarray(seq.logp),
            teacher_logmass,
            gamma=self.gamma,
            debias=self.debias,
        )
        sft_mask = token_in_loss(student.start_byte, student.end_byte, student.role, loss_spans)
        sft_mask[0] = False  # position 0 is never predicted
        hidden_teacher = None
        if self.with_hidden:
            # §7.1: the last token of every greedy chunk, loss masks not applied.
            hidden_teacher = seq.hidden_float32()[targets.teacher_chunk_last_pos]
        eval_example = None
        if self.with_eval:
            chunks = chunks_all.select(chunks_all.in_loss)
            eval_example = EvalExample(
                chunk_teacher_logp=chunk_logp_sums(
                    seq.logp, chunks.teacher_start, chunks.teacher_end
                ),
                chunk_student_start=chunks.student_start,
                chunk_student_end=chunks.student_end,
                num_bytes=len(seq.text),
                student_num_bytes=int(student.end_byte.max()) if len(student.end_byte) else 0,
                teacher_logp_sum=float(np.nansum(np.asarray(seq.logp, dtype=np.float64)[1:])),
            )
        example = StudentExample(
            input_ids=np.asarray(student.token_id, dtype=np.int64),
            sft_mask=sft_mask,
            targets=targets,
            hidden_teacher=hidden_teacher,
            eval=eval_example,
        )
        return example, chunks_all


def _pad_rows(rows: list[np.ndarray], fill: float | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or [n, d]) arrays to [B, max(1, longest)(, d)]; also the bool [B, L] mask of real rows."""
    length = max([1, *(len(row) for row in rows)])
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


def _collate_eval(examples: Sequence[EvalExample]) -> EvalTargets:
    chunk_teacher_logp, chunk_mask = _pad_rows([e.chunk_teacher_logp for e in examples], 0.0)
    return EvalTargets(
        chunk_teacher_logp=chunk_teacher_logp,
        chunk_mask=chunk_mask,
        chunk_student_start=_pad_rows([e.chunk_student_start for e in examples], 1)[0],
        chunk_student_end=_pad_rows([e.chunk_student_end for e in examples], 1)[0],
        num_bytes=torch.tensor([e.num_bytes for e in examples], dtype=torch.int64),
        student_num_bytes=torch.tensor([e.student_num_bytes for e in examples], dtype=torch.int64),
        teacher_logp_sum=torch.tensor([e.teacher_logp_sum for e in examples], dtype=torch.float64),
    )


def collate(examples: Sequence[StudentExample]) -> StudentBatch:
    """Pad examples into one `StudentBatch` of CPU tensors (ids padded with 0, masks with False)."""
    input_ids, attention_mask = _pad_rows([e.input_ids for e in examples], 0)
    sft_mask, _ = _pad_rows([e.sft_mask for e in examples], False)
    hidden = [e.hidden_teacher for e in examples]
    evals = [e.eval for e in examples]
    return StudentBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        sft_mask=sft_mask,
        num_sft_tokens=sft_mask.sum(),
        targets=pad_targets([e.targets for e in examples]),
        hidden_teacher=None
        if any(h is None for h in hidden)
        else _pad_rows([h for h in hidden if h is not None], 0.0)[0],
        eval=None
        if any(e is None for e in evals)
        else _collate_eval([e for e in evals if e is not None]),
    )
