"""`alm eval`'s bits per byte against direct float64 computations, the shared context convention, text pieces.

References are written from the definition (docs/evaluation.md): every text is tokenized on its own, preceded by
the model's context token, run alone (no padding), and its token log-probs are taken from a float64 log-softmax.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import TRICKY_TEXTS, bpe_tokenizer, byte_tokenizer, corpus_texts, tiny_llama
from tolerance import assert_fp32_close

from alm.errors import DataError
from alm.eval import EvalText, load_eval_texts, score_texts, scoring_model, split_text


def reference_nll_nats(model, tokenizer, context_ids: list[int], text: str) -> float:
    """-Σ ln p(t_i | context, t_<i) for the text's own tokens, in float64, one text per forward pass."""
    text_ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = torch.tensor([[*context_ids, *text_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return -float(logp[positions, ids[0, positions + 1]].sum())


def test_bpb_equals_direct_float64_computation_with_padding_and_batching() -> None:
    tokenizer = bpe_tokenizer(512)
    model = tiny_llama(len(tokenizer), seed=3)
    scorer = scoring_model(model, tokenizer, name="tiny")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert scorer.context_ids.tolist() == [eot] and scorer.context_rule == "eos"  # chatml: no bos
    strings = [*corpus_texts(6, seed=5), *TRICKY_TEXTS]
    texts = [EvalText(str(i), s.encode()) for i, s in enumerate(strings)]
    scores = score_texts(scorer, texts, token_budget=96)  # several batches, padded rows
    expected = np.array([reference_nll_nats(model, tokenizer, [eot], s) for s in strings])
    assert_fp32_close(scores.nll_nats, expected, scale=float(np.abs(expected).max()))
    num_bytes = sum(len(s.encode()) for s in strings)
    assert scores.num_bytes.sum() == num_bytes
    assert_fp32_close(scores.bits_per_byte, expected.sum() / (math.log(2) * num_bytes), scale=10)


def test_first_token_is_scored_after_the_bos_of_a_model_that_has_one() -> None:
    tokenizer = byte_tokenizer(("<s>", "</s>"))
    scorer = scoring_model(tiny_llama(len(tokenizer), seed=4), tokenizer, name="bytes")
    bos = tokenizer.convert_tokens_to_ids("<s>")
    assert scorer.context_ids.tolist() == [bos] and scorer.context_rule == "bos"
    scores = score_texts(scorer, [EvalText("a", b"x")])
    assert scores.num_tokens.tolist() == [1] and scores.num_bytes.tolist() == [1]
    expected = reference_nll_nats(scorer.model, tokenizer, [bos], "x")
    assert_fp32_close(scores.nll_nats[0], expected, scale=10)


class BytesAsTokens(torch.nn.Module):
    """A BPE "model" built on a byte model: at each BPE position it gives the actual next token the byte model's
    probability of that token's bytes (its remaining mass spread evenly over the other tokens), so it assigns
    every text exactly the byte model's probability through a different tokenization."""

    def __init__(self, byte_model, byte_tok, bpe_tok) -> None:
        super().__init__()
        from alm.vocab import vocab_from_tokenizer

        self.byte_model = byte_model
        self.config = byte_model.config
        self.bpe_vocab = vocab_from_tokenizer(bpe_tok)
        self.byte_context = byte_tok.convert_tokens_to_ids("<|endoftext|>")
        self.bpe_context = bpe_tok.convert_tokens_to_ids("<|endoftext|>")
        self.head = torch.nn.Linear(1, len(self.bpe_vocab), bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        vocab_size = len(self.bpe_vocab)
        out = torch.zeros(*input_ids.shape, vocab_size, dtype=torch.float64)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            assert ids[0] == self.bpe_context
            pieces = [self.bpe_vocab.token_bytes[i] for i in ids[1:]]
            byte_ids = torch.tensor([[self.byte_context, *b"".join(pieces)]])
            with torch.no_grad():
                byte_logp = torch.log_softmax(
                    self.byte_model(input_ids=byte_ids).logits[0].double(), -1
                )
            offset = 0  # byte position whose prediction starts the next token
            for pos, piece in enumerate(pieces):
                logp = sum(float(byte_logp[offset + k, piece[k]]) for k in range(len(piece)))
                rest = math.log(-math.expm1(logp)) - math.log(vocab_size - 1)
                out[row, pos].fill_(rest)
                out[row, pos, ids[pos + 1]] = logp
                offset += len(piece)
        return SimpleNamespace(logits=out.float())


def test_a_byte_model_and_a_bpe_model_with_the_same_byte_probabilities_get_the_same_bpb() -> None:
    byte_tok = byte_tokenizer()
    bpe_tok = bpe_tokenizer(512)
    byte_model = tiny_llama(len(byte_tok), seed=9)
    byte_scorer = scoring_model(byte_model, byte_tok, name="bytes")
    bpe_scorer = scoring_model(BytesAsTokens(byte_model, byte_tok, bpe_tok), bpe_tok, name="bpe")
    texts = [EvalText(str(i), s.encode()) for i, s in enumerate(corpus_texts(3, seed=2))]
    texts.append(EvalText("tricky", TRICKY_TEXTS[3].encode()))
    byte_scores = score_texts(byte_scorer, texts, token_budget=4096)
    bpe_scores = score_texts(bpe_scorer, texts, token_budget=4096)
    assert (bpe_scores.num_tokens < byte_scores.num_tokens).all()  # really different tokenizations
    assert_fp32_close(
        bpe_scores.nll_nats, byte_scores.nll_nats, scale=float(byte_scores.nll_nats.max())
    )
    assert_fp32_close(bpe_scores.bits_per_byte, byte_scores.bits_per_byte, scale=10)


@pytest.mark.parametrize("max_bytes", [4, 7, 64, 300])
def test_pieces_concatenate_to_the_text_and_respect_the_limit(max_bytes: int) -> None:
    text = ("".join(TRICKY_TEXTS) + corpus_texts(2)[1]).encode()
    pieces = split_text(text, max_bytes)
    assert b"".join(p for _, p in pieces) == text
    assert [s for s, _ in pieces] == np.cumsum([0] + [len(p) for _, p in pieces[:-1]]).tolist()
    for _, piece in pieces:
        assert 0 < len(piece) <= max_bytes
        piece.decode("utf-8")  # never cut inside a character


def test_text_files_jsonl_and_errors(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n" * 10)
    assert b"".join(t.text for t in load_eval_texts(txt, max_bytes=50)) == txt.read_bytes()
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "first"}\n"second"\n\n{"text": "   "}\n')
    assert [t.text for t in load_eval_texts(jsonl)] == [b"first", b"second"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="text"):
        load_eval_texts(bad)
    with pytest.raises(DataError, match="no such file"):
        load_eval_texts(tmp_path / "missing.txt")


def test_a_text_longer_than_the_model_is_refused_with_the_fix() -> None:
    tokenizer = byte_tokenizer()
    scorer = scoring_model(tiny_llama(len(tokenizer), max_positions=16), tokenizer, name="short")
    with pytest.raises(DataError, match="--max-bytes"):
        score_texts(scorer, [EvalText("long", b"x" * 40)])


def test_data_spec_heldout_documents_are_scored() -> None:
    texts = load_eval_texts("stdlib_docs_heldout", limit=3, max_bytes=256)
    assert texts and all(0 < len(t.text) <= 256 for t in texts)


@pytest.mark.slow
def test_real_teacher_bpb_equals_direct_float64_computation() -> None:
    """SmolLM2-135M-Instruct (the built-in teacher) on a few real texts: its context token is `<|endoftext|>`."""
    from alm.eval.models import load_hf_model

    scorer = load_hf_model("builtin:smollm2-135m-instruct")
    eot = scorer.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert scorer.context_ids.tolist() == [eot]
    strings = [*corpus_texts(3, seed=11), TRICKY_TEXTS[4], TRICKY_TEXTS[7]]
    texts = [EvalText(str(i), s.encode()) for i, s in enumerate(strings)]
    scores = score_texts(scorer, texts, token_budget=512)
    expected = np.array(
        [reference_nll_nats(scorer.model, scorer.tokenizer, [eot], s) for s in strings]
    )
    assert_fp32_close(scores.nll_nats, expected, ulps=256, scale=float(np.abs(expected).max()))
    assert 0.5 < scores.bits_per_byte < 3.0  # a real model on real text
