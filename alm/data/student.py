"""One stored teacher sequence -> the student's tokens and the ALM targets (DESIGN.md stage two, ALM_SPEC §3-§5).

Per stored sequence, on CPU (in DataLoader workers):

1. rebuild the teacher's token sequence from the stored ids and segments (`alm.templates.sequence_from_ids`);
2. re-render the same abstract segments with the student's tokenizer and template family
   (`document_from_stored` + `render`, truncated to the student's `max_length`);
3. align the two on byte offsets (`alm.align.align_sequences`, with the stored loss spans);
4. combine the stored boundary classes into the teacher's boundary log-mass (logsumexp over the chosen classes)
   and build the ALM targets (`alm.align.targets.build_alm_targets`: chunk sums, gamma-merging, debiasing);
5. add the student's SFT loss mask, and for the hidden-state loss the teacher hidden states at the last token of
   each greedy chunk, and for evaluation the greedy chunks' teacher log-probs.

Never decodes text to `str`. Imports `alm.templates`, `alm.align` and `alm.vocab`; never torch.distributed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alm.align import align_sequences
from alm.align.targets import build_alm_targets, combine_boundary_classes
from alm.losses.batch import pad_targets
from alm.templates import document_from_stored, render, sequence_from_ids, token_in_loss
from alm.vocab import Vocab

logger = logging.getLogger(__name__)


def chunk_logp_sums(logp: np.ndarray, start_pos: np.ndarray, end_pos: np.ndarray) -> np.ndarray:
    """float32 [C]: sums of per-token log-probs over `[start_pos, end_pos)` (positions >= 1), by prefix sums."""
    values = np.nan_to_num(np.asarray(logp, dtype=np.float64), nan=0.0)
    values[0] = 0.0
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    return (prefix[end_pos] - prefix[start_pos]).astype(np.float32)


class StudentExampleBuilder:
    """Callable that turns a `StoredSequence` into the arrays of one student example (picklable for workers)."""

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
        self.boundary_class_ids = list(boundary_class_ids)
        self.gamma = gamma
        self.debias = debias
        self.with_hidden = with_hidden
        self.with_eval = with_eval

    def __call__(self, seq: Any) -> dict[str, Any]:
        teacher = sequence_from_ids(seq, self.teacher_vocab)
        document = document_from_stored(seq)
        student = render(
            document,
            self.student_tokenizer,
            self.student_vocab,
            self.student_family,
            max_length=self.max_length,
        )
        loss_spans = np.asarray(seq.loss_spans, dtype=np.int64).reshape(-1, 2)
        chunks_all = align_sequences(teacher, student, loss_spans, keep_outside_loss=True)
        chunks = chunks_all.select(chunks_all.in_loss)
        teacher_logmass = combine_boundary_classes(
            np.asarray(seq.boundary_logmass), tuple(self.boundary_class_ids)
        )
        targets = build_alm_targets(
            chunks_all,
            np.asarray(seq.logp),
            teacher_logmass,
            gamma=self.gamma,
            debias=self.debias,
        )
        input_ids = np.asarray(student.token_id, dtype=np.int64)
        sft_mask = token_in_loss(student.start_byte, student.end_byte, student.role, loss_spans)
        sft_mask[0] = False  # position 0 is never predicted
        example: dict[str, Any] = {"targets": targets, "input_ids": input_ids, "sft_mask": sft_mask}
        if self.with_hidden:
            # §7.1: the last token of every greedy chunk, loss masks not applied.
            example["hidden_teacher"] = seq.hidden_float32()[targets.teacher_chunk_last_pos]
        if self.with_eval:
            example["chunk_teacher_logp"] = chunk_logp_sums(
                seq.logp, chunks.teacher_start, chunks.teacher_end
            )
            example["chunk_student_start"] = chunks.student_start
            example["chunk_student_end"] = chunks.student_end
            example["num_bytes"] = np.int64(len(seq.text))
            example["student_num_bytes"] = np.int64(
                student.end_byte.max() if len(student.end_byte) else 0
            )
            example["teacher_logp_sum"] = np.float64(
                np.nansum(np.asarray(seq.logp, dtype=np.float64)[1:])
            )
        return example


_PADDED_KEYS = {
    # key: (mask key or None, pad value)
    "input_ids": ("attention_mask", 0),
    "sft_mask": (None, False),
    "hidden_teacher": (
        None,
        0.0,
    ),  # aligned with `chunk_mask` / `student_chunk_last_pos` of `pad_targets`
    "chunk_teacher_logp": ("eval_chunk_mask", 0.0),
    "chunk_student_start": (None, 1),
    "chunk_student_end": (None, 1),
}


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad examples into one micro-batch of CPU tensors.

    The ALM targets go through `alm.losses.batch.pad_targets` (groups, greedy-chunk positions, masks, counts);
    the other ragged arrays are padded to [B, max(1, longest)(, d)] with their own masks, and padded eval chunks
    are empty token ranges `[1, 1)`. Scalars (`num_bytes`, `teacher_logp_sum`) become [B] tensors. Adds
    `num_sft_tokens` (int64 scalar) for the step normaliser.
    """
    batch = pad_targets([e["targets"] for e in examples])
    for key in examples[0]:
        if key == "targets":
            continue
        values = [np.asarray(e[key]) for e in examples]
        if values[0].ndim == 0:
            batch[key] = torch.as_tensor(np.stack(values))
            continue
        mask_key, pad = _PADDED_KEYS[key]
        length = max([1, *(len(v) for v in values)])
        out = np.full((len(values), length, *values[0].shape[1:]), pad, dtype=values[0].dtype)
        mask = np.zeros((len(values), length), dtype=bool)
        for i, v in enumerate(values):
            out[i, : len(v)] = v
            mask[i, : len(v)] = True
        batch[key] = torch.from_numpy(out)
        if mask_key is not None:
            batch[mask_key] = torch.from_numpy(mask)
    batch["num_sft_tokens"] = batch["sft_mask"].sum()
    return batch
