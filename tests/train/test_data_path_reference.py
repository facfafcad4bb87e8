"""The fast data path (issue 11) is bit-identical to the reference it replaced (`reference/data_path_v1.py`).

Random documents (plain text and chat turns with every loss region, Unicode, literal marker strings, truncation on
either side) are stored by a BPE teacher with random teacher values, then built into examples and collated both
by `StudentExampleBuilder` + `collate` and by the reference, for a byte, a BPE and a SentencePiece student. Every
array must be equal, dtype included: the alignment cache's `ALIGNMENT_VERSION` relies on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import TRICKY_TEXTS, bpe_tokenizer, byte_tokenizer, sentencepiece_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import data_path_v1 as reference

from alm.align.chunks import Chunks
from alm.align.targets import AlmTargets
from alm.store.reader import StoredSequence
from alm.templates import chat_document, plain_document, render
from alm.train.batch import StudentExampleBuilder, collate
from alm.vocab import encode_text, encode_texts, vocab_from_tokenizer

GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
PIECES = [
    *TRICKY_TEXTS,
    "Hello world",
    " the",
    "\n\n",
    "  ",
    "\t",
    "<|im_start|>",
    "<|im_end|>",
    "<start_of_turn>",
    "日本語",
    "ü",
    "😀",
    "a",
    "x = 1\n",
]
TEXT = st.lists(
    st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), min_size=0, max_size=8
).map("".join)
MESSAGES = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT), max_size=4)


def _student(kind: str):
    return {
        "bytes": byte_tokenizer,
        "bpe": lambda: bpe_tokenizer(900),
        "sentencepiece": lambda: sentencepiece_tokenizer(specials=GEMMA_SPECIALS),
    }[kind]()


def _stored(document, tokenizer, vocab, max_length, seed) -> StoredSequence:
    seq = render(document, tokenizer, vocab, None, max_length=max_length)
    rng = np.random.default_rng(seed)
    n = len(seq.token_id)
    logp = -rng.exponential(2.0, size=n).astype(np.float32)
    if n:
        logp[0] = np.nan
    boundary = np.log(rng.dirichlet(np.ones(6), size=n)[:, :5]).astype(np.float32)
    return StoredSequence(
        seq_id=seed,
        doc_id=document.doc_id,
        source=document.source,
        row=document.row,
        shard=0,
        text=seq.text,
        segments=seq.segments,
        loss_spans=seq.loss_spans,
        truncated=seq.truncated,
        token_id=seq.token_id,
        logp=logp,
        boundary_logmass=boundary,
    )


def _assert_same_arrays(new, old, fields, what):
    for field in fields:
        a, b = np.asarray(getattr(new, field)), np.asarray(getattr(old, field))
        assert a.dtype == b.dtype, (what, field, a.dtype, b.dtype)
        assert a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), (
            what,
            field,
            a,
            b,
        )


_TARGET_FIELDS = list(AlmTargets.__dataclass_fields__)
_CHUNK_FIELDS = list(Chunks.__dataclass_fields__)


@pytest.mark.parametrize("student_kind", ["bytes", "bpe", "sentencepiece"])
@settings(max_examples=40, deadline=None)
@given(
    documents=st.lists(
        st.tuples(
            st.booleans(), TEXT, MESSAGES, st.sampled_from(["all", "assistant", "last_assistant"])
        ),
        min_size=1,
        max_size=4,
    ),
    teacher_max_length=st.sampled_from([None, 6, 17, 40]),
    student_max_length=st.sampled_from([4096, 5, 12, 33]),
)
def test_examples_and_batches_equal_the_reference(
    student_kind, documents, teacher_max_length, student_max_length
):
    teacher_tok = bpe_tokenizer(512)
    teacher_vocab = vocab_from_tokenizer(teacher_tok)
    student_tok = _student(student_kind)
    builder = StudentExampleBuilder(
        teacher_vocab=teacher_vocab,
        student_tokenizer=student_tok,
        student_vocab=vocab_from_tokenizer(student_tok),
        student_family="auto",
        max_length=student_max_length,
        boundary_class_ids=[0, 1, 2, 4],
        gamma=0.1,
    )
    new_examples, old_examples, kept, old_chunk_list = [], [], [], []
    for i, (is_chat, text, messages, loss) in enumerate(documents):
        if is_chat and any(role == "assistant" for role, _ in messages):
            encoded = [(role, content.encode()) for role, content in messages]
            document = chat_document(f"c{i}", "s", i, encoded, loss=loss)
        else:
            document = plain_document(f"d{i}", "s", i, text.encode())
        seq = _stored(document, teacher_tok, teacher_vocab, teacher_max_length, seed=i)
        if len(seq.token_id) == 0:
            continue
        try:
            old_example, old_chunks = reference.build(builder, seq)
        except IndexError:  # an empty student rendering has no position 0 to mask: both must fail
            with pytest.raises(IndexError):
                builder.build(seq)
            continue
        new_example, new_chunks = builder.build(seq)
        _assert_same_arrays(new_example, old_example, ["input_ids", "sft_mask"], "example")
        _assert_same_arrays(new_example.targets, old_example.targets, _TARGET_FIELDS, "targets")
        _assert_same_arrays(new_chunks, old_chunks, _CHUNK_FIELDS, "chunks")
        new_examples.append(new_example)
        old_examples.append(old_example)
        kept.append(seq)
        old_chunk_list.append(old_chunks)
    if not new_examples:
        return
    # a micro-batch built at once (one student tokenizer call for all its text) gives the same examples
    assert builder.build_many([]) == []
    for (many, many_chunks), old_example, old_chunks in zip(
        builder.build_many(kept), old_examples, old_chunk_list, strict=True
    ):
        _assert_same_arrays(many, old_example, ["input_ids", "sft_mask"], "build_many")
        _assert_same_arrays(many.targets, old_example.targets, _TARGET_FIELDS, "build_many targets")
        _assert_same_arrays(many_chunks, old_chunks, _CHUNK_FIELDS, "build_many chunks")
    new_batch, old_batch = collate(new_examples), reference.collate(old_examples)
    for field in ("input_ids", "attention_mask", "sft_mask", "num_sft_tokens"):
        a, b = getattr(new_batch, field), getattr(old_batch, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    for field in new_batch.targets.__dataclass_fields__:
        a, b = getattr(new_batch.targets, field), getattr(old_batch.targets, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field


@pytest.mark.parametrize("student_kind", ["bytes", "bpe", "sentencepiece"])
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_encode_text_equals_the_tokenizers_own_ids(student_kind, text):
    tokenizer = _student(student_kind)
    vocab = vocab_from_tokenizer(tokenizer)
    new, old = (
        encode_text(tokenizer, vocab, text.encode()),
        reference.encode_text(tokenizer, vocab, text.encode()),
    )
    _assert_same_arrays(new, old, ["token_id", "start_byte", "end_byte"], "encode_text")
    assert (new.num_bytes, new.dummy_prefix) == (old.num_bytes, old.dummy_prefix)


@pytest.mark.parametrize("student_kind", ["bytes", "bpe", "sentencepiece"])
@settings(max_examples=40, deadline=None)
@given(texts=st.lists(TEXT, max_size=5))
def test_encode_texts_equals_encode_text_of_each(student_kind, texts):
    tokenizer = _student(student_kind)
    vocab = vocab_from_tokenizer(tokenizer)
    raw = [text.encode() for text in texts]
    raw.append(b"a\xe2\x82")  # a trailing partial UTF-8 character is left out, as by encode_text
    many = encode_texts(tokenizer, vocab, raw)
    assert len(many) == len(raw)
    for new, text in zip(many, raw, strict=True):
        old = reference.encode_text(tokenizer, vocab, text)
        _assert_same_arrays(new, old, ["token_id", "start_byte", "end_byte"], "encode_texts")
        assert (new.num_bytes, new.dummy_prefix) == (old.num_bytes, old.dummy_prefix)
