"""What one student micro-batch is, and how it is built from stored teacher sequences (DESIGN.md stage two,
ALM_SPEC §3-§5, §7).

Owns `StudentExample` (one sequence, NumPy), `StudentBatch` (a padded micro-batch, torch: every field the losses
and the evaluation read, in one definition), `EvalTargets`, `StudentExampleBuilder` and `collate`.

Per stored sequence, on CPU (in DataLoader workers), `StudentExampleBuilder`:

1. rebuilds the teacher's token sequence from the stored ids and segments (`alm.templates.sequence_from_stored`);
2. re-renders the same abstract segments with the student's tokenizer and template family
   (`document_from_stored` + `render`, truncated to the student's `max_length`);
3. aligns the two on byte offsets (`alm.align.align_sequences`, with the stored loss spans);
4. combines the stored boundary classes into the teacher's boundary log-mass (logsumexp over the chosen classes)
   and builds the ALM targets (`alm.align.build_alm_targets`: chunk sums, gamma-merging, debiasing);
5. adds the student's SFT loss mask (`alm.templates.token_in_loss`, the one loss-region rule), for the hidden-state loss the teacher hidden states at the last token of
   each greedy chunk, and for evaluation the greedy chunks' teacher log-probs;
6. for a baseline loss (`topk_kd`, `uld`, `mined`; `docs/baselines.md`), pairs student positions with the
   teacher's stored top-k (`baseline_positions`), in student ids (MinED: through `MinedVocabMap`).

`collate` pads a micro-batch: the ALM targets through `alm.losses.batch.pad_targets` (the loss's own typed input),
the rest here. Never decodes text to `str`. Never imports torch.distributed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alm.align.chunks import Chunks, align_many, align_with_loss_masks
from alm.align.targets import (
    AlmTargets,
    build_alm_targets,
    chunk_logp_sums,
    combine_boundary_classes,
)
from alm.errors import AlignmentError, StoreError
from alm.losses.baselines import MinedVocabMap, one_to_one_chunk_positions
from alm.losses.batch import PaddedTargets, pad_targets
from alm.templates import (
    Document,
    TokenizedSequence,
    document_from_stored,
    encode_documents,
    render,
    sequence_from_stored,
    token_in_loss,
)
from alm.vocab import TokenizedText, Vocab


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
class DistillExample:
    """A baseline's inputs for one sequence (P = paired positions, k = the store's top-k).

    Attributes:
        student_pos: int64 [P], student positions whose next-token distribution is matched.
        teacher_pos: int64 [P], the paired teacher positions (their stored top-k predicts token + 1).
        topk_id: int64 [P, k], the paired teacher top-k as student-vocabulary ids (`uld` ignores them).
        topk_logp: float32 [P, k], their teacher natural-log probabilities.
    """

    student_pos: np.ndarray
    teacher_pos: np.ndarray
    topk_id: np.ndarray
    topk_logp: np.ndarray


@dataclass(frozen=True)
class DistillTargets:
    """`DistillExample`s padded (P = most positions, at least 1; padded rows are position 0 with a uniform,
    finite top-k so the masked-out loss terms stay finite).

    Attributes:
        student_pos: int64 [B, P]; topk_id: int64 [B, P, k]; topk_logp: float32 [B, P, k]; mask: bool [B, P].
    """

    student_pos: torch.Tensor
    topk_id: torch.Tensor
    topk_logp: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> DistillTargets:
        """The same targets on `device`."""
        return DistillTargets(
            student_pos=self.student_pos.to(device),
            topk_id=self.topk_id.to(device),
            topk_logp=self.topk_logp.to(device),
            mask=self.mask.to(device),
        )


@dataclass(frozen=True)
class StudentExample:
    """One stored sequence seen by the student (Ts = student tokens, C = greedy chunks, d_T = teacher width).

    Attributes:
        input_ids: int64 [Ts], the student's tokens.
        sft_mask: bool [Ts], the tokens SFT trains on (never position 0).
        targets: the ALM targets (groups and greedy chunks).
        hidden_teacher: float32 [C, d_T], the teacher's hidden state at each greedy chunk's last token, or None.
        eval: held-out figures, or None outside evaluation.
        distill: a baseline loss's paired positions and teacher top-k, or None.
    """

    input_ids: np.ndarray
    sft_mask: np.ndarray
    targets: AlmTargets
    hidden_teacher: np.ndarray | None = None
    eval: EvalExample | None = None
    distill: DistillExample | None = None


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
        distill: a baseline loss's padded inputs, or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sft_mask: torch.Tensor
    num_sft_tokens: torch.Tensor
    targets: PaddedTargets
    hidden_teacher: torch.Tensor | None = None
    eval: EvalTargets | None = None
    distill: DistillTargets | None = None

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
            distill=None if self.distill is None else self.distill.to(device),
        )


def baseline_positions(
    baseline: str,
    teacher: TokenizedSequence,
    student: TokenizedSequence,
    chunks: Chunks,
    teacher_in_loss: np.ndarray,
    student_in_loss: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(teacher, student) positions whose next-token distributions a baseline compares (int64 [P] each).

    The stored top-k at teacher position q is the distribution predicting token q + 1, so a pair (q, s) matches
    it with the student's logits at s.

    - `topk_kd` (same tokenizer): the student's tokens are the teacher's, so q = s, for every in-loss token s ≥ 1
      (predicted at s − 1).
    - `uld`: Boizard et al. pair the t-th predicted answer token of one model with the t-th of the other, cut to
      the shorter: the in-loss tokens of each side in order, paired by index.
    - `mined`: the 1:1 chunks (`alm.losses.baselines.one_to_one_chunk_positions`).

    Args:
        teacher_in_loss, student_in_loss: bool [Tt], [Ts], each side's loss region (position 0 excluded).

    Raises:
        AlignmentError: `topk_kd` with a student whose tokens differ from the teacher's.
    """
    if baseline == "mined":
        return one_to_one_chunk_positions(chunks)
    student_targets = np.flatnonzero(student_in_loss[1:]).astype(
        np.int64
    )  # s - 1 for in-loss s >= 1
    if baseline == "topk_kd":
        n = len(student.token_id)
        same = n <= len(teacher.token_id) and np.array_equal(
            np.asarray(student.token_id, dtype=np.int64),
            np.asarray(teacher.token_id[:n], dtype=np.int64),
        )
        if not same:
            raise AlignmentError(
                "loss.kind topk_kd needs the student to tokenize each sequence exactly as the teacher did, but "
                f"a stored sequence ({len(teacher.token_id)} teacher tokens) re-renders as {n} different "
                "student tokens; train a student with the teacher's tokenizer and template family, or use a "
                "cross-tokenizer loss (alm, uld, mined+sft)"
            )
        return student_targets, student_targets
    assert baseline == "uld", baseline
    teacher_targets = np.flatnonzero(teacher_in_loss[1:]).astype(np.int64)
    num = min(len(teacher_targets), len(student_targets))
    return teacher_targets[:num], student_targets[:num]


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
        baseline: str | None = None,
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
        self.baseline = baseline
        self._mined_map: MinedVocabMap | None = None

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

    def build_many(self, seqs: Sequence[Any]) -> list[tuple[StudentExample, Chunks]]:
        """`self.build(seq)` for each of `seqs` (a micro-batch), at once where that is faster and gives the same
        results: the student tokenizer is called once for all their text (`encode_documents`) and the
        alignment covers all of them in each NumPy call (`align_many`)."""
        documents = [document_from_stored(seq) for seq in seqs]
        encodings = encode_documents(
            documents, self.student_tokenizer, self.student_vocab, self.max_length
        )
        sides = [
            self._sides(seq, document, encoded)
            for seq, document, encoded in zip(seqs, documents, encodings, strict=True)
        ]
        aligned = align_many(sides, keep_outside_loss=True)
        return [
            self._example(seq, *side, chunks_all, sft_mask)
            for seq, side, (chunks_all, _, sft_mask) in zip(seqs, sides, aligned, strict=True)
        ]

    def build(self, seq: Any) -> tuple[StudentExample, Chunks]:
        """The example and every aligned greedy chunk behind it (in the loss or not; `alm align` caches both)."""
        teacher, student, loss_spans = self._sides(seq, document_from_stored(seq), None)
        # the SFT mask is the student's `token_in_loss`, which the alignment computes anyway
        chunks_all, _, sft_mask = align_with_loss_masks(
            teacher, student, loss_spans, keep_outside_loss=True
        )
        return self._example(seq, teacher, student, loss_spans, chunks_all, sft_mask)

    def _sides(
        self, seq: Any, document: Document, text_encodings: Mapping[int, TokenizedText] | None
    ) -> tuple[TokenizedSequence, TokenizedSequence, np.ndarray]:
        """The teacher's stored tokens, the student's rendering of `document` and the loss spans of `seq`."""
        teacher = sequence_from_stored(seq, self.teacher_vocab)
        student = render(
            document,
            self.student_tokenizer,
            self.student_vocab,
            self.student_family,
            max_length=self.max_length,
            text_encodings=text_encodings,
        )
        return teacher, student, np.asarray(seq.loss_spans, dtype=np.int64).reshape(-1, 2)

    def _example(
        self,
        seq: Any,
        teacher: TokenizedSequence,
        student: TokenizedSequence,
        loss_spans: np.ndarray,
        chunks_all: Chunks,
        sft_mask: np.ndarray,
    ) -> tuple[StudentExample, Chunks]:
        """The example of `seq` from its aligned sides (`sft_mask`: the student's `token_in_loss`)."""
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
        sft_mask[0] = False  # position 0 is never predicted
        distill = None
        if self.baseline is not None:
            distill = self._distill(seq, teacher, student, chunks_all, loss_spans, sft_mask)
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
            distill=distill,
        )
        return example, chunks_all

    def _mined(self) -> MinedVocabMap:
        if self._mined_map is None:
            # special tokens map by role (eos to eos), never by the edit distance of their empty bytes
            fixed = {}
            for teacher_id, role in self.teacher_vocab.special_role.items():
                student_id = self.student_vocab.id_for_role(role)
                if student_id is not None:
                    fixed[teacher_id] = student_id
            self._mined_map = MinedVocabMap(
                list(self.teacher_vocab.token_bytes), list(self.student_vocab.token_bytes), fixed
            )
        return self._mined_map

    def _distill(
        self,
        seq: Any,
        teacher: TokenizedSequence,
        student: TokenizedSequence,
        chunks: Chunks,
        loss_spans: np.ndarray,
        sft_mask: np.ndarray,
    ) -> DistillExample:
        assert self.baseline is not None
        if seq.topk_id is None or seq.topk_logp is None:
            raise StoreError(
                f"loss.kind needs the stored top-k, but sequence {seq.seq_id} has no `topk_id`/`topk_logp`; "
                "rerun precompute with e.g. `top_k: 64`"
            )
        teacher_in_loss = token_in_loss(
            teacher.start_byte, teacher.end_byte, teacher.role, loss_spans
        )
        teacher_in_loss[0] = False
        teacher_pos, student_pos = baseline_positions(
            self.baseline, teacher, student, chunks, teacher_in_loss, sft_mask
        )
        topk_id = np.asarray(seq.topk_id, dtype=np.int64)[teacher_pos]  # [P, k], teacher ids
        if topk_id.size and (topk_id.min() < 0 or topk_id.max() >= self.teacher_vocab.size):
            raise StoreError(
                f"sequence {seq.seq_id}: stored top-k ids leave the teacher vocabulary "
                f"[0, {self.teacher_vocab.size}); the store is inconsistent with its vocabulary"
            )
        if self.baseline == "mined":
            topk_id = self._mined()(topk_id)  # [P, k], student ids
        elif self.baseline == "uld":
            topk_id = np.zeros_like(topk_id)  # sorted probabilities need no ids
        return DistillExample(
            student_pos=student_pos,
            teacher_pos=teacher_pos,
            topk_id=topk_id,
            topk_logp=np.asarray(seq.topk_logp, dtype=np.float32)[teacher_pos],
        )


def _pad_rows(rows: list[np.ndarray], fill: float | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or [n, d]) arrays to [B, max(1, longest)(, d)]; also the bool [B, L] mask of real rows."""
    lengths = [len(row) for row in rows]
    length = max([1, *lengths])
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]  # [B, L]
    if rows[0].ndim == 1:  # one scatter instead of a copy per row
        out[mask] = np.concatenate(rows)
    else:
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
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


def _collate_distill(examples: Sequence[DistillExample]) -> DistillTargets:
    student_pos, mask = _pad_rows([e.student_pos for e in examples], 0)
    k = examples[0].topk_logp.shape[-1]
    topk_id, _ = _pad_rows([e.topk_id.reshape(-1, k) for e in examples], 0)
    # padded rows: a uniform top-k over id 0 repeated, finite everywhere (masked out of the loss)
    topk_logp, _ = _pad_rows([e.topk_logp.reshape(-1, k) for e in examples], -float(np.log(k)))
    return DistillTargets(student_pos=student_pos, topk_id=topk_id, topk_logp=topk_logp, mask=mask)


def collate(examples: Sequence[StudentExample]) -> StudentBatch:
    """Pad examples into one `StudentBatch` of CPU tensors (ids padded with 0, masks with False)."""
    input_ids, attention_mask = _pad_rows([e.input_ids for e in examples], 0)
    sft_mask, _ = _pad_rows([e.sft_mask for e in examples], False)
    hidden = [e.hidden_teacher for e in examples]
    evals = [e.eval for e in examples]
    distills = [e.distill for e in examples]
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
        distill=None
        if any(d is None for d in distills)
        else _collate_distill([d for d in distills if d is not None]),
    )
