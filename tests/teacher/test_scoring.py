"""Logits -> store arrays (`alm.teacher.scoring`), pinned against a direct per-position computation in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alm.teacher.base import boundary_class_masks, plan_padded_batches
from alm.teacher.scoring import class_mass_matrix, scores_from_hidden, scores_from_logits
from tests.tolerance import assert_fp32_close


def reference_scores(logits: np.ndarray, token_ids: np.ndarray, masks: np.ndarray, top_k: int = 0):
    """Straight from the definitions (docs/architecture.md), one position at a time, in float64."""
    logits = logits.astype(np.float64)
    n = logits.shape[0]
    logp = np.full(n, np.nan)
    blm = np.empty((n, masks.shape[0]))
    topk_id = np.empty((n, top_k), dtype=np.int64)
    topk_logp = np.empty((n, top_k))
    for q in range(n):
        row = logits[q]
        row_max = row.max()
        log_norm = row_max + math.log(np.exp(row - row_max).sum())
        if q >= 1:
            prev = logits[q - 1]
            prev_max = prev.max()
            logp[q] = prev[token_ids[q]] - (prev_max + math.log(np.exp(prev - prev_max).sum()))
        for c in range(masks.shape[0]):
            members = row[masks[c]]
            if members.size == 0:
                blm[q, c] = -np.inf
            else:
                m = members.max()
                blm[q, c] = m + math.log(np.exp(members - m).sum()) - log_norm
        if top_k:
            order = np.argsort(-row, kind="stable")[:top_k]
            topk_id[q] = order
            topk_logp[q] = row[order] - log_norm
    return logp, blm, topk_id, topk_logp


def random_case(seed: int, n: int = 9, vocab: int = 61, scale: float = 4.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    token_ids = rng.integers(0, vocab, size=n)
    classes = rng.integers(-1, 5, size=vocab)
    classes[classes == 2] = -1  # an empty class (tab): must come out as -inf
    return logits, token_ids, boundary_class_masks(classes.astype(np.int8), vocab)


def assert_close_with_inf(actual: np.ndarray, expected: np.ndarray, scale: float = 1.0) -> None:
    """fp32 values agree to a few ulps (tests/tolerance.py); -inf (an empty class) must match exactly."""
    assert_fp32_close(actual, expected, scale=scale)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_direct_computation_at_every_position(seed: int) -> None:
    logits, token_ids, masks = random_case(seed)
    scores = scores_from_logits(torch.from_numpy(logits), token_ids, masks, top_k=5, row_chunk=4)
    logp, blm, topk_id, topk_logp = reference_scores(logits, token_ids, masks, top_k=5)
    assert scores.logp.dtype == np.float32 and scores.boundary_logmass.dtype == np.float32
    assert np.isnan(scores.logp[0]) and np.isnan(logp[0])
    assert_fp32_close(scores.logp[1:], logp[1:])
    assert scores.boundary_logmass.shape == (len(token_ids), 5)
    assert_close_with_inf(scores.boundary_logmass, blm)  # includes the last position
    assert np.all(np.isneginf(scores.boundary_logmass[:, 2]))  # the empty class
    np.testing.assert_array_equal(scores.topk_id, topk_id)
    assert_fp32_close(scores.topk_logp, topk_logp)


def test_class_masses_and_rest_sum_to_one() -> None:
    logits, token_ids, masks = random_case(3)
    every_token = np.zeros_like(masks)
    every_token[0] = masks.any(axis=0)
    every_token[1] = ~masks.any(axis=0)
    scores = scores_from_logits(torch.from_numpy(logits), token_ids, every_token)
    total = np.exp(scores.boundary_logmass[:, 0].astype(np.float64)) + np.exp(
        scores.boundary_logmass[:, 1]
    )
    assert_fp32_close(total, np.ones_like(total))


@settings(deadline=None, max_examples=25)
@given(row_chunk=st.integers(1, 12), seed=st.integers(0, 3))
def test_row_chunk_size_does_not_change_results(row_chunk: int, seed: int) -> None:
    logits, token_ids, masks = random_case(seed)
    whole = scores_from_logits(
        torch.from_numpy(logits), token_ids, masks, top_k=3, row_chunk=10_000
    )
    chunked = scores_from_logits(
        torch.from_numpy(logits), token_ids, masks, top_k=3, row_chunk=row_chunk
    )
    assert_fp32_close(chunked.logp, whole.logp, equal_nan=True)
    assert_close_with_inf(chunked.boundary_logmass, whole.boundary_logmass)
    np.testing.assert_array_equal(chunked.topk_id, whole.topk_id)


def test_caller_logits_are_not_modified() -> None:
    logits, token_ids, masks = random_case(4)
    tensor = torch.from_numpy(logits.copy())
    scores_from_logits(tensor, token_ids, masks, top_k=2, row_chunk=3)
    np.testing.assert_array_equal(tensor.numpy(), logits)


def test_underflowing_class_mass_is_exact_not_minus_inf() -> None:
    logits, token_ids, masks = random_case(5)
    # every member of the 'special' class sits ~200 nats below the maximum: exp() underflows in fp32
    logits[:, masks[4]] -= 200.0
    scores = scores_from_logits(torch.from_numpy(logits), token_ids, masks)
    _, blm, _, _ = reference_scores(logits, token_ids, masks)
    assert np.all(np.isfinite(scores.boundary_logmass[:, 4]))
    assert np.all(scores.boundary_logmass[:, 4] < -150)
    assert_close_with_inf(scores.boundary_logmass, blm)


def test_bf16_logits_are_scored_in_fp32() -> None:
    logits, token_ids, masks = random_case(6)
    bf16 = torch.from_numpy(logits).to(torch.bfloat16)
    scores = scores_from_logits(bf16, token_ids, masks)
    logp, blm, _, _ = reference_scores(bf16.to(torch.float32).numpy(), token_ids, masks)
    assert_fp32_close(scores.logp[1:], logp[1:])
    assert_close_with_inf(scores.boundary_logmass, blm)


def test_padded_vocab_rows_belong_to_no_class() -> None:
    rng = np.random.default_rng(7)
    tokenizer_classes = rng.integers(-1, 5, size=50).astype(np.int8)
    masks = boundary_class_masks(tokenizer_classes, 64)  # model has 14 padded rows
    assert masks.shape == (5, 64)
    assert not masks[:, 50:].any()
    np.testing.assert_array_equal(
        masks[:, :50], tokenizer_classes[None, :] == np.arange(5)[:, None]
    )
    logits = rng.standard_normal((6, 64)).astype(np.float32)
    token_ids = rng.integers(0, 50, size=6)
    scores = scores_from_logits(torch.from_numpy(logits), token_ids, masks)
    _, blm, _, _ = reference_scores(logits, token_ids, masks)
    assert_close_with_inf(scores.boundary_logmass, blm)
    # the padded rows' mass is counted in the normaliser: the classes sum to less than one
    assert np.all(np.exp(scores.boundary_logmass.astype(np.float64)).sum(axis=1) < 1.0)


def test_one_token_sequence_has_nan_logp_and_boundary_mass() -> None:
    logits, token_ids, masks = random_case(8, n=1)
    scores = scores_from_logits(torch.from_numpy(logits), token_ids, masks)
    _, blm, _, _ = reference_scores(logits, token_ids, masks)
    assert scores.logp.shape == (1,) and np.isnan(scores.logp[0])
    assert_close_with_inf(scores.boundary_logmass, blm)


def test_concatenated_sequences_score_like_separate_ones() -> None:
    rng = np.random.default_rng(9)
    vocab, d = 40, 8
    lengths = [5, 1, 7, 3]
    hidden = torch.from_numpy(rng.standard_normal((sum(lengths), d)).astype(np.float32))
    weight = torch.from_numpy(rng.standard_normal((vocab, d)).astype(np.float32))
    token_ids = torch.from_numpy(rng.integers(0, vocab, size=sum(lengths)))
    masks = boundary_class_masks(rng.integers(-1, 5, size=vocab).astype(np.int8), vocab)
    joint = scores_from_hidden(
        hidden,
        lambda h: h @ weight.T,
        token_ids,
        lengths,
        class_mass_matrix(torch.from_numpy(masks)),
        top_k=4,
        row_chunk=3,
        keep_hidden=True,
    )
    start = 0
    for n, got in zip(lengths, joint, strict=True):
        end = start + n
        alone = scores_from_logits(
            hidden[start:end] @ weight.T, token_ids[start:end], masks, top_k=4
        )
        assert np.isnan(got.logp[0])
        assert_fp32_close(got.logp, alone.logp, equal_nan=True)
        assert_close_with_inf(got.boundary_logmass, alone.boundary_logmass)
        np.testing.assert_array_equal(got.topk_id, alone.topk_id)
        np.testing.assert_array_equal(got.hidden, hidden[start:end].numpy())
        start = end


@settings(deadline=None, max_examples=60)
@given(lengths=st.lists(st.integers(1, 50), min_size=0, max_size=30), budget=st.integers(1, 200))
def test_padded_batches_cover_each_sequence_once_within_budget(
    lengths: list[int], budget: int
) -> None:
    batches = plan_padded_batches(lengths, budget)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1
    assert plan_padded_batches(lengths, budget) == batches
