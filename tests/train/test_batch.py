"""Stage-two data path: a stored teacher sequence -> student tokens, loss mask and ALM targets (glue checks).

The teacher side is a real rendering with a real tokenizer, given random teacher values (the model does not
matter here); the student side is re-rendered by `StudentExampleBuilder`. The ALM maths itself is pinned in
`tests/align` and `tests/losses`; here we check that the pieces are wired with the right offsets and masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import bpe_tokenizer, byte_tokenizer, corpus_texts, sentencepiece_tokenizer

from alm.align.targets import chunk_logp_sums
from alm.store.reader import StoredSequence
from alm.templates import chat_document, plain_document, render, token_in_loss
from alm.train.batch import StudentExampleBuilder, collate
from alm.vocab import vocab_from_tokenizer


def stored_from(document, tokenizer, max_length=None, seed=0, hidden_size=0) -> StoredSequence:
    """What the store would hold for `document` scored by some teacher with `tokenizer` (random values)."""
    vocab = vocab_from_tokenizer(tokenizer)
    seq = render(document, tokenizer, vocab, None, max_length=max_length)
    rng = np.random.default_rng(seed)
    n = len(seq.token_id)
    logp = -rng.exponential(2.0, size=n).astype(np.float32)
    logp[0] = np.nan
    boundary = np.log(rng.dirichlet(np.ones(6), size=n)[:, :5]).astype(np.float32)
    hidden = None
    if hidden_size:
        hidden = rng.normal(size=(n, hidden_size)).astype(np.float16)
    return StoredSequence(
        seq_id=0,
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
        hidden=hidden,
        hidden_encoding="float16" if hidden_size else None,
    )


def builder(teacher_tok, student_tok, **kwargs) -> StudentExampleBuilder:
    return StudentExampleBuilder(
        teacher_vocab=vocab_from_tokenizer(teacher_tok),
        student_tokenizer=student_tok,
        student_vocab=vocab_from_tokenizer(student_tok),
        student_family=kwargs.pop("family", "auto"),
        max_length=kwargs.pop("max_length", 4096),
        boundary_class_ids=[0, 1, 2, 4],
        gamma=0.1,
        **kwargs,
    )


@pytest.mark.parametrize("student_kind", ["bytes", "bpe", "sentencepiece"])
def test_groups_cover_the_same_bytes_on_both_sides(student_kind):
    teacher_tok = bpe_tokenizer(512)
    student_tok = {
        "bytes": byte_tokenizer(),
        "bpe": bpe_tokenizer(900),
        "sentencepiece": sentencepiece_tokenizer(),
    }[student_kind]
    student_vocab = vocab_from_tokenizer(student_tok)
    teacher_vocab = vocab_from_tokenizer(teacher_tok)
    for i, text in enumerate(corpus_texts(6)):
        doc = plain_document(f"d{i}", "t", i, text.encode())
        stored = stored_from(doc, teacher_tok, seed=i)
        example = builder(teacher_tok, student_tok, with_eval=True)(stored)
        targets = example.targets
        ids = example.input_ids
        assert targets.num_groups > 0
        for g in range(targets.num_groups):
            s0, s1 = targets.student_group_start[g], targets.student_group_end[g]
            t0, t1 = targets.teacher_group_start[g], targets.teacher_group_end[g]
            assert s0 >= 1 and t0 >= 1  # position 0 never in a chunk (§5.1)
            student_bytes = b"".join(student_vocab.token_bytes[j] for j in ids[s0:s1])
            teacher_bytes = b"".join(teacher_vocab.token_bytes[j] for j in stored.token_id[t0:t1])
            assert (
                student_bytes.lstrip(b" ") == teacher_bytes.lstrip(b" ")
                or student_bytes == teacher_bytes
            )
        assert len(example.eval.chunk_teacher_logp) == len(example.eval.chunk_student_start) > 0


def test_student_tokens_are_the_documents_student_rendering():
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    text = corpus_texts(1)[0].encode()
    doc = plain_document("d", "t", 0, text)
    example = builder(teacher_tok, student_tok)(stored_from(doc, teacher_tok))
    expected = render(doc, student_tok, vocab_from_tokenizer(student_tok), None)
    np.testing.assert_array_equal(example.input_ids, expected.token_id)
    # plain document: bos, bytes..., eos; the loss covers every text byte and the closing eos, not the bos
    assert not example.sft_mask[0] and example.sft_mask[1:].all()


def test_chat_loss_mask_trains_assistant_turns_and_their_closing_block():
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    doc = chat_document(
        "c",
        "t",
        0,
        [
            ("user", b"What is two plus two?"),
            ("assistant", b"Four."),
            ("user", b"And three?"),
            ("assistant", b"Five, no, six."),
        ],
    )
    stored = stored_from(doc, teacher_tok)
    example = builder(teacher_tok, student_tok)(stored)
    student = render(doc, student_tok, vocab_from_tokenizer(student_tok), None)
    mask = example.sft_mask
    trained_text = b"".join(
        student.text[s:e]
        for s, e, r, m in zip(student.start_byte, student.end_byte, student.role, mask)
        if m and r is None
    )
    assert trained_text == b"Four.Five, no, six."
    # Blocks by segment order (alm.templates.token_in_loss): a trained turn's closing eot, never a header (not
    # even the next turn's, at the same byte offset as that eot).
    trained_blocks = [r for r, m in zip(student.role, mask) if m and r is not None]
    assert trained_blocks == ["eot"] * (list(student.role).count("eot") // 2)  # 2 of 4 turns
    # ALM groups only inside the loss region too
    in_loss = token_in_loss(student.start_byte, student.end_byte, student.role, stored.loss_spans)
    t = example.targets
    for g in range(t.num_groups):
        assert in_loss[t.student_group_start[g] : t.student_group_end[g]].all()


def test_truncated_student_keeps_only_the_aligned_prefix():
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    text = " ".join(corpus_texts(4)).encode()
    stored = stored_from(plain_document("d", "t", 0, text), teacher_tok, max_length=64)
    # 64 teacher tokens cover at least 64 bytes whatever the corpus, so a 48-byte student is truncated
    assert len(stored.text) > 48
    example = builder(teacher_tok, student_tok, max_length=48)(stored)
    assert len(example.input_ids) == 48
    assert example.targets.student_group_end.max() <= 48


def test_hidden_rows_are_the_teacher_states_at_greedy_chunk_ends():
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    stored = stored_from(
        plain_document("d", "t", 0, corpus_texts(1)[0].encode()), teacher_tok, hidden_size=8
    )
    example = builder(teacher_tok, student_tok, with_hidden=True)(stored)
    pos = example.targets.teacher_chunk_last_pos
    np.testing.assert_array_equal(example.hidden_teacher, stored.hidden_float32()[pos])


def test_collate_pads_without_changing_any_example():
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    make = builder(teacher_tok, student_tok, with_eval=True, with_hidden=True)
    examples = [
        make(
            stored_from(
                plain_document(f"d{i}", "t", i, t.encode()), teacher_tok, seed=i, hidden_size=4
            )
        )
        for i, t in enumerate(corpus_texts(3))
    ]
    batch = collate(examples)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert torch.equal(batch.input_ids[i, :n], torch.from_numpy(ex.input_ids))
        assert batch.attention_mask[i].sum() == n
        g = ex.targets.num_groups
        assert batch.targets.group_mask[i].sum() == g
        c = ex.targets.num_chunks
        assert torch.equal(batch.hidden_teacher[i, :c], torch.from_numpy(ex.hidden_teacher))
    assert int(batch.targets.num_groups) == sum(e.targets.num_groups for e in examples)
    assert int(batch.num_sft_tokens) == sum(int(e.sft_mask.sum()) for e in examples)


def test_chunk_logp_sums_match_direct_sums():
    logp = np.array([np.nan, -1.0, -2.0, -0.5, -3.0], dtype=np.float32)
    np.testing.assert_allclose(
        chunk_logp_sums(logp, np.array([1, 3]), np.array([3, 5])), [-3.0, -3.5]
    )
