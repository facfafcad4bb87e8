"""Packed rows in the HF backend (issue 11 target 2): several sequences per row, block-diagonal attention through
position ids, every stored value equal (to fp32 ulps) to scoring each sequence alone, on tiny Llama and Qwen2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alm.teacher.base import (
    pack_rows,
    packed_layout,
    padded_fraction,
    plan_batches,
    plan_padded_batches,
)
from alm.teacher.hf import HFTeacher
from tests.factories import bpe_tokenizer, corpus_texts, tiny_llama
from tests.teacher.test_scoring import assert_close_with_inf
from tests.tolerance import assert_fp32_close


def tiny_qwen2(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def teacher_dir(request, tmp_path_factory: pytest.TempPathFactory):
    tokenizer = bpe_tokenizer()
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model = (
        tiny_llama(len(tokenizer), seed=3)
        if request.param == "llama"
        else tiny_qwen2(len(tokenizer), 3)
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def boundary_class():
    from alm.vocab import vocab_from_tokenizer

    return vocab_from_tokenizer(bpe_tokenizer()).boundary_class


@pytest.fixture(scope="module")
def sequences():
    tokenizer = bpe_tokenizer()
    texts = corpus_texts(12, seed=9)
    seqs = [
        np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][: 8 + 5 * i], dtype=np.int32)
        for i, t in enumerate(texts)
    ]
    return [*seqs, np.asarray([1], dtype=np.int32), np.asarray([0, 7], dtype=np.int32)]


def test_packed_rows_score_like_one_sequence_per_row(teacher_dir, boundary_class, sequences):
    kwargs = {
        "device": "cpu",
        "top_k": 4,
        "hidden_states": True,
        "token_budget": 96,
        "row_chunk": 16,
    }
    packed = HFTeacher(str(teacher_dir), boundary_class, **kwargs)
    alone = HFTeacher(str(teacher_dir), boundary_class, pack=False, **kwargs)
    assert packed.pack and not alone.pack
    lengths = [len(s) for s in sequences]
    rows = pack_rows(lengths, max(lengths))
    assert max(len(row) for row in rows) > 1  # the layout really packs several sequences per row
    for got, want in zip(packed.score(sequences), alone.score(sequences), strict=True):
        assert np.isnan(got.logp[0]) and np.isnan(want.logp[0])
        assert_fp32_close(got.logp[1:], want.logp[1:])
        assert_close_with_inf(got.boundary_logmass, want.boundary_logmass)
        assert_fp32_close(got.topk_logp, want.topk_logp)
        np.testing.assert_array_equal(got.topk_id[:, 0], want.topk_id[:, 0])
        assert_fp32_close(got.hidden, want.hidden)


def test_packing_pads_less_than_one_sequence_per_row():
    rng = np.random.default_rng(0)
    # docstring-like lengths: mostly short, a few cut at max_length 192 (mean ~36 tokens)
    lengths = np.clip(rng.lognormal(3.3, 0.8, 256), 2, 192).astype(int).tolist()
    budget = 2048
    padded = [[[i] for i in batch] for batch in plan_padded_batches(lengths, budget)]
    packed = packed_layout(lengths, budget)
    assert padded_fraction(padded, lengths) > 0.2  # one sequence per row: a fifth is padding
    assert padded_fraction(packed, lengths) < 0.02


@settings(deadline=None, max_examples=80)
@given(lengths=st.lists(st.integers(1, 60), min_size=0, max_size=40), budget=st.integers(1, 300))
def test_packed_batches_cover_each_sequence_once_within_budget(lengths, budget):
    batches = plan_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    if not lengths:
        return
    row_tokens = max(lengths)
    for batch in batches:
        rows = pack_rows([lengths[i] for i in batch], row_tokens)
        assert all(sum(lengths[batch[i]] for i in row) <= row_tokens for row in rows)
        assert len(rows) * row_tokens <= budget or len(rows) == 1
    assert plan_batches(lengths, budget) == batches
    layout = packed_layout(lengths, budget)
    assert [i for rows in layout for row in rows for i in row] == [i for b in batches for i in b]
    rows = pack_rows(lengths, row_tokens)
    # first-fit decreasing: no two rows could be merged
    sums = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(sums) < 2 or sums[0] + sums[1] > row_tokens
