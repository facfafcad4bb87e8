"""Bits per byte of held-out text under any model, on exactly the text's bytes (DESIGN.md "Measuring quality").

For one text x of |x| UTF-8 bytes, tokenized by a model's own tokenizer into t_1..t_n (exact bytes,
`alm.vocab.encode_text`) and preceded by the model's context token c (`alm.eval.models.context_token_ids`):

    NLL(x) = - sum_{i=1..n} ln p(t_i | c, t_1..t_{i-1})          (nats, summed in float64)
    BPB    = sum_x NLL(x) / (ln 2 * sum_x |x|)

Every text token is scored, the first one included; no end-of-text token is scored; a SentencePiece dummy prefix
space is part of the first token (it is how such a model writes the text). Texts are batched by length under a
token budget, right-padded; padding never enters a sum.

Imports `alm.eval.models`, `alm.losses.alm` (`token_stats`), `alm.vocab`, `alm.errors`; torch, tqdm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from alm.errors import DataError
from alm.eval.models import Scorer
from alm.eval.texts import EvalText
from alm.losses.alm import token_stats
from alm.vocab import encode_text

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TextScores:
    """Per-text results of one model.

    Attributes:
        nll_nats: float64 [N], summed next-token NLL of each text's tokens (nats).
        num_bytes: int64 [N], UTF-8 bytes of each text.
        num_tokens: int64 [N], the model's tokens for each text (context token not counted).
    """

    nll_nats: np.ndarray
    num_bytes: np.ndarray
    num_tokens: np.ndarray

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(float(self.nll_nats.sum()), int(self.num_bytes.sum()))

    @property
    def bytes_per_token(self) -> float:
        return float(self.num_bytes.sum()) / max(int(self.num_tokens.sum()), 1)


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Summed NLL in nats over the bytes it covers, in bits per byte."""
    return nll_nats / (LN2 * max(num_bytes, 1))


def next_token_logp(
    logits: torch.Tensor, target_ids: torch.Tensor, *, vocab_size: int | None = None
) -> torch.Tensor:
    """float64 [B, T]: entry q is ln p(target_ids[b, q] | tokens 0..q) over a padded batch, 0 where the target is -1
    (padding, context tokens, the last position). Minus a row's sum is that row's summed next-token NLL.

    Args:
        logits: [B, T, V] (any float dtype; `alm.losses.alm.token_stats` does the maths in fp32).
        target_ids: int64 [B, T], the token that position q predicts, or -1.
        vocab_size: real vocabulary size when V has padded columns.
    """
    next_logp, _ = token_stats(logits, target_ids, None, vocab_size=vocab_size)
    return next_logp.double()


def chunk_abs_logp_diff(
    token_logp: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    teacher_chunk_logp: torch.Tensor,
    chunk_mask: torch.Tensor,
) -> torch.Tensor:
    """float64 [B]: per row, the sum over chunks of |log p_T(chunk) - log p_S(chunk)| (ALM_SPEC §1, no debiasing).

    log p_S(chunk) = min(sum of token_logp over [start, end), 0), from float64 prefix sums.

    Args:
        token_logp: [B, T] the student's log-prob of each token, indexed by the token (0 where not scored, e.g. at
            position 0 and padding).
        start, end: int64 [B, C], each chunk's student token range.
        teacher_chunk_logp: [B, C], the teacher's log-prob of each chunk.
        chunk_mask: bool [B, C], which chunks count.
    """
    values = token_logp.double()
    prefix = torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(dim=1)], dim=1)
    student = (prefix.gather(1, end) - prefix.gather(1, start)).clamp(max=0.0)  # [B, C]
    diff = (teacher_chunk_logp.double() - student).abs()
    return torch.where(chunk_mask, diff, 0.0).sum(dim=1)


def _token_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices grouped longest first so that batch size x longest length <= token_budget (at least one text)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def encode_for_scoring(scorer: Scorer, texts: Sequence[EvalText]) -> list[np.ndarray]:
    """Context token(s) + the text's exact-bytes tokens, int64, per text.

    Raises:
        TokenizerRefusedError: the tokenizer cannot reproduce a text's bytes.
        DataError: a text needs more positions than the model has.
    """
    out = []
    for text in texts:
        ids = np.concatenate(
            [scorer.context_ids, encode_text(scorer.tokenizer, scorer.vocab, text.text).token_id]
        ).astype(np.int64)
        if scorer.max_positions is not None and len(ids) > scorer.max_positions:
            raise DataError(
                f"text {text.text_id!r} is {len(ids)} tokens for model {scorer.name!r}, which has "
                f"{scorer.max_positions} positions; evaluate with a smaller --max-bytes (now cutting at "
                f"{len(text.text)}+ bytes)"
            )
        out.append(ids)
    return out


@torch.no_grad()
def score_texts(
    scorer: Scorer,
    texts: Sequence[EvalText],
    *,
    token_budget: int = 4096,
    progress: bool = False,
) -> TextScores:
    """Summed next-token NLL of every text under `scorer` (a `ScoringModel` or an `Ensemble`).

    Args:
        scorer: the model.
        texts: from `alm.eval.texts.load_eval_texts` (or any `EvalText`s).
        token_budget: padded tokens per forward pass.
        progress: show a tqdm bar.

    Returns:
        `TextScores` in the order of `texts`.

    Raises:
        TokenizerRefusedError, DataError: see `encode_for_scoring`.
    """
    sequences = encode_for_scoring(scorer, texts)
    num_context = len(scorer.context_ids)
    nll = np.zeros(len(texts), dtype=np.float64)
    batches = _token_batches([len(s) for s in sequences], token_budget)
    bar = tqdm(
        total=sum(len(s) for s in sequences),
        desc=f"scoring {scorer.name}",
        unit="tok",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for batch in batches:
        length = len(sequences[batch[0]])
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros(len(batch), length, dtype=torch.long)  # [B, T]
        target_ids = torch.full(
            (len(batch), length), -1, dtype=torch.long
        )  # [B, T] token q+1 or -1
        for row, i in enumerate(batch):
            ids = torch.as_tensor(sequences[i])
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            # position q predicts token q+1; text tokens start at position num_context
            target_ids[row, num_context - 1 : len(ids) - 1] = ids[num_context:]
        logits = scorer.next_token_logits(input_ids, attention_mask)  # [B, T, V]
        next_logp = next_token_logp(logits, target_ids.to(logits.device))  # [B, T], 0 where -1
        nll[batch] = -next_logp.sum(dim=1).cpu().numpy()
        bar.update(int(attention_mask.sum()))
    bar.close()
    return TextScores(
        nll_nats=nll,
        num_bytes=np.array([len(t.text) for t in texts], dtype=np.int64),
        num_tokens=np.array([len(s) - num_context for s in sequences], dtype=np.int64),
    )
