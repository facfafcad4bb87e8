"""Agreement of a model with a teacher store, on the teacher's own chunks (ALM_SPEC §4-§6, DESIGN.md "Measuring quality").

For every stored sequence, the model re-renders the stored document with its own tokenizer and template family
(as stage two does), the two tokenizations are aligned on byte offsets (`alm.align.align_sequences`, loss spans
of the store), and two figures are accumulated over the in-loss chunks:

- **chunk agreement**: the mean over greedy chunks of |log p_T(chunk) - log p_S(chunk)| (no debiasing, no
  merging; both sides summed over the chunk's tokens, positions >= 1, §5.1);
- **binarised KL**: the mean over γ-merged, debiased chunk groups (`alm.align.build_alm_targets`, the same groups
  ALM trains on) of the binarised KL at temperature τ, computed with `alm.losses.alm.binarised_divergence` as
  binary_ce(T, S) - binary_ce(T, T) (the teacher's binary entropy removed), so it is 0 iff the two group
  probabilities agree.

Both are 0 for a model that equals the teacher. Imports `alm.align`, `alm.templates`, `alm.losses`, `alm.store`,
`alm.align.targets` (chunk sums), `alm.eval.score` (`chunk_abs_logp_diff`), `alm.config.train` (the default boundary classes), `alm.eval.models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from alm.align import align_sequences
from alm.align.targets import build_alm_targets, chunk_logp_sums, combine_boundary_classes
from alm.config.train import LossConfig
from alm.eval.models import Scorer
from alm.eval.score import _token_batches, chunk_abs_logp_diff
from alm.losses.alm import (
    binarised_divergence,
    sequence_logp_and_boundary_logmass,
    student_group_logp,
)
from alm.losses.batch import pad_targets
from alm.store.reader import StoredSequence, open_store
from alm.templates import document_from_stored, render, resolve_family, sequence_from_stored

STORE_FIELDS = ["token_id", "logp", "boundary_logmass"]


@dataclass(frozen=True)
class Agreement:
    """A model's agreement with a teacher store.

    Attributes:
        chunk_abs_logp_diff: mean |log p_T(chunk) - log p_S(chunk)| over greedy chunks (nats).
        binarised_kl: mean binarised KL over merged, debiased groups at `temperature`.
        num_chunks: greedy chunks counted.
        num_groups: merged groups counted.
        num_sequences: stored sequences used.
        temperature, gamma: the settings used.
    """

    chunk_abs_logp_diff: float
    binarised_kl: float
    num_chunks: int
    num_groups: int
    num_sequences: int
    temperature: float
    gamma: float


def read_store_sequences(store: str, limit: int | None = None) -> list[StoredSequence]:
    """The first `limit` sequences of a teacher store (all when None), in stored order."""
    out = []
    for seq in open_store(store).iter_sequences(STORE_FIELDS):
        if limit is not None and len(out) >= limit:
            break
        out.append(seq)
    return out


@torch.no_grad()
def store_agreement(
    scorer: Scorer,
    store: str,
    *,
    sequences: Sequence[StoredSequence] | None = None,
    limit: int | None = None,
    temperature: float = 100.0,
    gamma: float = 0.1,
    boundary_class_ids: Sequence[int] | None = None,
    token_budget: int = 4096,
    progress: bool = False,
) -> Agreement:
    """Chunk agreement and binarised KL of `scorer` against the teacher store at `store`.

    Args:
        scorer: a `ScoringModel` or an `Ensemble`.
        store: the teacher store (folder or URL).
        sequences: already-read stored sequences of `store` (else read, up to `limit`).
        limit: at most this many stored sequences.
        temperature, gamma: τ and γ of the ALM loss (paper defaults).
        boundary_class_ids: stored boundary classes that count as a boundary (default: training's default).
        token_budget: padded student tokens per forward pass.
        progress: show a tqdm bar.

    Raises:
        StoreError: the store cannot be read.
        TokenizerRefusedError: the model's tokenizer cannot reproduce a stored text.
    """
    teacher_vocab = open_store(store).vocab
    seqs = list(sequences) if sequences is not None else read_store_sequences(store, limit)
    classes = tuple(boundary_class_ids or LossConfig().boundary_class_ids())
    family = resolve_family("auto", scorer.tokenizer)  # as stage two's `family: auto` renders
    boundary_mask = torch.as_tensor(scorer.vocab.boundary_mask(classes))
    examples = []
    for seq in seqs:
        teacher = sequence_from_stored(seq, teacher_vocab)
        student = render(
            document_from_stored(seq),
            scorer.tokenizer,
            scorer.vocab,
            family,
            max_length=scorer.max_positions,
        )
        chunks = align_sequences(teacher, student, np.asarray(seq.loss_spans).reshape(-1, 2))
        targets = build_alm_targets(
            chunks,
            np.asarray(seq.logp),
            combine_boundary_classes(np.asarray(seq.boundary_logmass), classes),
            gamma=gamma,
        )
        teacher_chunk_logp = np.minimum(
            chunk_logp_sums(seq.logp, chunks.teacher_start, chunks.teacher_end), 0.0
        )
        examples.append(
            (np.asarray(student.token_id, np.int64), chunks, teacher_chunk_logp, targets)
        )

    abs_diff_sum = kl_sum = 0.0
    num_chunks = num_groups = 0
    bar = tqdm(
        total=len(examples),
        desc=f"agreement {scorer.name}",
        unit="seq",
        disable=not progress,
        leave=False,
    )
    for batch in _token_batches([len(e[0]) for e in examples], token_budget):
        length = len(examples[batch[0]][0])
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)  # [B, Ts]
        attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(examples[i][0])] = torch.as_tensor(examples[i][0])
            attention_mask[row, : len(examples[i][0])] = 1
        logits = scorer.next_token_logits(input_ids, attention_mask).cpu()  # [B, Ts, V]
        token_logp, boundary_logmass = sequence_logp_and_boundary_logmass(
            logits, input_ids, boundary_mask
        )  # [B, Ts] each, NaN at position 0
        scored_logp = torch.nan_to_num(token_logp, nan=0.0)  # [B, Ts], 0 at position 0 and padding
        for row, i in enumerate(batch):
            _, chunks, teacher_chunk_logp, _ = examples[i]
            abs_diff_sum += float(
                chunk_abs_logp_diff(
                    scored_logp[row : row + 1],
                    torch.as_tensor(chunks.student_start, dtype=torch.long)[None],
                    torch.as_tensor(chunks.student_end, dtype=torch.long)[None],
                    torch.as_tensor(teacher_chunk_logp)[None],
                    torch.ones(1, len(chunks), dtype=torch.bool),
                ).sum()
            )
            num_chunks += len(chunks)
        padded = pad_targets([examples[i][3] for i in batch])
        student_logp = student_group_logp(
            torch.nan_to_num(token_logp, nan=0.0), boundary_logmass, padded
        )  # [B, G]
        teacher_logp = padded.teacher_group_logp  # [B, G]
        mask = padded.group_mask
        kl = binarised_divergence(teacher_logp, student_logp, temperature=temperature) - (
            binarised_divergence(teacher_logp, teacher_logp, temperature=temperature)
        )  # [B, G]
        kl_sum += float(torch.where(mask, kl.double(), 0.0).sum())
        num_groups += int(mask.sum())
        bar.update(len(batch))
    bar.close()
    return Agreement(
        chunk_abs_logp_diff=abs_diff_sum / max(num_chunks, 1),
        binarised_kl=kl_sum / max(num_groups, 1),
        num_chunks=num_chunks,
        num_groups=num_groups,
        num_sequences=len(examples),
        temperature=temperature,
        gamma=gamma,
    )
