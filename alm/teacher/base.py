"""The teacher backend contract: what `alm precompute` asks of a teacher, whatever runs it.

A backend scores already-tokenized sequences with teacher forcing and returns, per sequence, the raw
(temperature 1, no processors) per-token quantities the store keeps (ALM_SPEC.md §10.1, T0-T4):

- `logp` float32 [n]: `logp[q] = log p_T(token_q | tokens[:q])`, NaN at q = 0;
- `boundary_logmass` float32 [n, 5]: at every position q (the last included), the log of the total probability of
  each first-byte boundary class (0 space, 1 newline, 2 tab, 3 other whitespace, 4 special) under the distribution
  that predicts token q+1; -inf for an empty class;
- optional `topk_id` int32 / `topk_logp` float32 [n, k]: top-k of the same distribution, descending;
- optional `hidden` float32 [n, d]: the final-norm hidden state at q (the input of the LM head).

Batching helpers shared by the backends live here too: `pack_rows` packs several sequences into each row of a
forward pass (first-fit decreasing, so padding is only the unfilled tail of a row) and `plan_batches` groups rows
into forward passes by a token budget; `plan_padded_batches` is the earlier one-sequence-per-row layout, kept for
backends that cannot pack and for the benchmark's "before" figure. Imports numpy only; no torch, no config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from alm.boundary import NUM_BOUNDARY_CLASSES


@dataclass(frozen=True)
class TeacherScores:
    """Teacher quantities for one sequence of n tokens (see the module docstring for the conventions)."""

    logp: np.ndarray  # float32 [n], NaN at 0
    boundary_logmass: np.ndarray  # float32 [n, 5]
    topk_id: np.ndarray | None = None  # int32 [n, k]
    topk_logp: np.ndarray | None = None  # float32 [n, k]
    hidden: np.ndarray | None = None  # float32 [n, d]

    @property
    def num_tokens(self) -> int:
        return int(self.logp.shape[0])


@runtime_checkable
class TeacherBackend(Protocol):
    """A teacher that scores token sequences. Implemented by `HFTeacher` and the vLLM backend.

    Attributes:
        name: backend name written to the manifest (`hf`, `vllm`).
        version: version string of the engine (e.g. `transformers 5.20.2`).
        model_id: what the recipe named (HF id, local path, or `builtin:...`).
        model_revision: the hub revision or a content hash of a local folder; "" if unknown.
        model_config_hash: short hash of the model's config (architecture, sizes).
        vocab_size: rows of the model's output distribution (may exceed the tokenizer's size).
        hidden_size: width of `hidden` when hidden states are requested.
        boundary_method: how `boundary_logmass` is computed (`exact` for full-softmax backends).
    """

    name: str
    version: str
    model_id: str
    model_revision: str
    model_config_hash: str
    vocab_size: int
    hidden_size: int
    boundary_method: str

    def score(self, batch_token_ids: list[np.ndarray]) -> list[TeacherScores]:
        """Score sequences with teacher forcing; output order equals input order.

        Args:
            batch_token_ids: int32 [n_i] token ids per sequence (each n_i >= 1).

        Returns:
            One `TeacherScores` per input sequence.
        """
        ...


def pack_rows(num_tokens: list[int] | np.ndarray, row_tokens: int) -> list[list[int]]:
    """Pack sequences into rows of at most `row_tokens` tokens, first-fit decreasing (deterministic).

    Sequences are taken longest first (ties in input order) and each goes into the first row it fits in; a
    sequence longer than `row_tokens` gets a row of its own. Within a row, sequences keep that order.

    Args:
        num_tokens: length of each sequence, in tokens.
        row_tokens: capacity of a row, in tokens.

    Returns:
        Rows as lists of indices into `num_tokens`.
    """
    lengths = np.asarray(num_tokens, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for idx in order.tolist():
        n = int(lengths[idx])
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(idx)
                free[r] -= n
                break
        else:
            rows.append([idx])
            free.append(max(0, row_tokens - n))
    return rows


def plan_batches(num_tokens: list[int] | np.ndarray, token_budget: int) -> list[list[int]]:
    """Group sequences into forward passes of packed rows: rows x row length <= `token_budget`.

    The row length is the longest sequence; `pack_rows` fills each row with several sequences, and consecutive rows
    form a batch of `token_budget // row length` rows (at least one). Each batch lists its sequences row by row, in
    row order. Deterministic: the same lengths always give the same batches.

    Args:
        num_tokens: length of each sequence, in tokens.
        token_budget: maximum of `rows * row length` per batch (a sequence longer than the budget gets a batch of
            its own).

    Returns:
        Batches as lists of indices into `num_tokens`, in processing order.
    """
    lengths = np.asarray(num_tokens, dtype=np.int64)
    if len(lengths) == 0:
        return []
    row_tokens = int(lengths.max())
    rows = pack_rows(lengths, row_tokens)
    rows_per_batch = max(1, token_budget // max(row_tokens, 1))
    return [
        [idx for row in rows[b : b + rows_per_batch] for idx in row]
        for b in range(0, len(rows), rows_per_batch)
    ]


def packed_layout(num_tokens: list[int] | np.ndarray, token_budget: int) -> list[list[list[int]]]:
    """The forward passes a packing backend runs for these sequences: per pass, its rows of sequence indices.

    `plan_batches` groups the sequences; each group is packed with `pack_rows` at the row length of the longest
    sequence of the whole call. Deterministic.
    """
    lengths = np.asarray(num_tokens, dtype=np.int64)
    if len(lengths) == 0:
        return []
    row_tokens = int(lengths.max())
    return [
        [[batch[i] for i in row] for row in pack_rows(lengths[batch], row_tokens)]
        for batch in plan_batches(lengths, token_budget)
    ]


def padded_fraction(batches: list[list[list[int]]], num_tokens: list[int] | np.ndarray) -> float:
    """Fraction of the computed positions that are padding, for batches given as rows of sequence indices.

    Each batch is a [rows, longest row] tensor; its padding is every position beyond a row's real tokens.
    """
    lengths = np.asarray(num_tokens, dtype=np.int64)
    computed = real = 0
    for rows in batches:
        row_sums = [int(lengths[row].sum()) for row in rows]
        computed += len(rows) * max(row_sums)
        real += sum(row_sums)
    return 1.0 - real / computed if computed else 0.0


def plan_padded_batches(num_tokens: list[int] | np.ndarray, token_budget: int) -> list[list[int]]:
    """Group sequences into batches whose padded size (rows x longest row) stays within `token_budget`.

    Sequences are taken longest first (so each batch pads little); a sequence longer than the budget gets a batch of
    its own. Deterministic: the same lengths always give the same batches.

    Args:
        num_tokens: length of each sequence, in tokens.
        token_budget: maximum of `len(batch) * max(lengths in batch)`.

    Returns:
        Batches as lists of indices into `num_tokens`, in processing order.
    """
    lengths = np.asarray(num_tokens, dtype=np.int64)
    # stable sort, longest first; ties keep input order
    order = np.argsort(-lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for idx in order.tolist():
        n = int(lengths[idx])
        new_max = max(current_max, n)
        if current and new_max * (len(current) + 1) > token_budget:
            batches.append(current)
            current, new_max = [], n
        current.append(idx)
        current_max = new_max
    if current:
        batches.append(current)
    return batches


def boundary_class_masks(boundary_class: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bool [5, vocab_size] class membership from a vocab's `boundary_class` (int8 [V_tok], -1 = none).

    Rows of the model's distribution beyond the tokenizer's vocabulary (padded embedding rows) belong to no class;
    tokenizer ids beyond the model's rows are dropped (the model cannot predict them).
    """
    boundary_class = np.asarray(boundary_class)
    classes = np.full(vocab_size, -1, dtype=np.int16)
    n = min(vocab_size, boundary_class.shape[0])
    classes[:n] = boundary_class[:n]
    return classes[None, :] == np.arange(NUM_BOUNDARY_CLASSES, dtype=np.int16)[:, None]
