"""Alignment of real tokenizers on real text (ALM_SPEC.md §2–§4): SmolLM2's tokenizer as the teacher against a
byte tokenizer, a locally trained byte-level BPE and a locally trained SentencePiece model; plain and chat
documents rendered with each family's template; emoji, CJK, combining characters, whitespace runs and code."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from factories import (
    TRICKY_TEXTS,
    bpe_tokenizer,
    byte_tokenizer,
    corpus_texts,
    sentencepiece_tokenizer,
    smollm2_tokenizer,
)
from reference.alm_reference import reference_align

from alm.align import align_sequences, build_alm_targets
from alm.templates import chat_document, plain_document, render
from alm.vocab import vocab_from_tokenizer

STUDENTS = ("bytes", "bpe", "sentencepiece")


@functools.cache
def tokenizer_and_vocab(name: str):
    tokenizer = {
        "smollm2": smollm2_tokenizer,
        "bytes": byte_tokenizer,
        "bpe": bpe_tokenizer,
        "sentencepiece": lambda: sentencepiece_tokenizer(
            specials=("<start_of_turn>", "<end_of_turn>")
        ),
    }[name]()
    return tokenizer, vocab_from_tokenizer(tokenizer)


def texts() -> list[str]:
    return [*TRICKY_TEXTS, *corpus_texts(6, seed=3)]


def documents():
    docs = [plain_document(f"plain{i}", "test", i, text.encode()) for i, text in enumerate(texts())]
    tricky = [t.encode() for t in TRICKY_TEXTS]
    for i in range(0, len(tricky) - 2, 3):
        messages = [("system", tricky[i]), ("user", tricky[i + 1]), ("assistant", tricky[i + 2])]
        docs.append(chat_document(f"chat{i}", "test", i, messages, loss="assistant"))
    return docs


def token_strings(sequence) -> tuple[list[bytes], list]:
    """Per token: its bytes in the content text (b"" for blocks and zero-width dummy prefixes) and its role."""
    text = sequence.text
    tokens = [text[s:e] for s, e in zip(sequence.start_byte.tolist(), sequence.end_byte.tolist())]
    return tokens, list(sequence.role)


def rendered_pair(
    student: str, document, teacher_max: int | None = None, student_max: int | None = None
):
    teacher_tok, teacher_vocab = tokenizer_and_vocab("smollm2")
    student_tok, student_vocab = tokenizer_and_vocab(student)
    teacher = render(document, teacher_tok, teacher_vocab, max_length=teacher_max)
    student_seq = render(document, student_tok, student_vocab, max_length=student_max)
    return teacher, student_seq, teacher_vocab, student_vocab


@pytest.mark.parametrize("student", STUDENTS)
def test_real_tokenizations_align_like_the_reference_walk(student):
    for document in documents():
        teacher, student_seq, _, _ = rendered_pair(student, document)
        spans = teacher.loss_spans
        chunks = align_sequences(teacher, student_seq, spans)
        teacher_tokens, teacher_roles = token_strings(teacher)
        student_tokens, student_roles = token_strings(student_seq)
        expected = reference_align(
            teacher_tokens,
            student_tokens,
            teacher_roles,
            student_roles,
            [tuple(s) for s in spans.tolist()],
        )
        got = list(
            zip(
                chunks.teacher_start.tolist(),
                chunks.teacher_end.tolist(),
                chunks.student_start.tolist(),
                chunks.student_end.tolist(),
                chunks.start_byte.tolist(),
                chunks.end_byte.tolist(),
            )
        )
        want = [
            (
                c.teacher_start,
                c.teacher_end,
                c.student_start,
                c.student_end,
                c.start_byte,
                c.end_byte,
            )
            for c in expected
        ]
        assert got == want, document.doc_id
        assert len(chunks) > 0, document.doc_id


@pytest.mark.parametrize("student", STUDENTS)
def test_chunks_of_real_tokenizations_spell_the_same_bytes_on_both_sides(student):
    for document in documents():
        teacher, student_seq, teacher_vocab, student_vocab = rendered_pair(student, document)
        chunks = align_sequences(teacher, student_seq)
        for ts, te, ss, se, start, end, block in zip(
            chunks.teacher_start,
            chunks.teacher_end,
            chunks.student_start,
            chunks.student_end,
            chunks.start_byte,
            chunks.end_byte,
            chunks.is_block,
        ):
            if block:
                assert set(teacher.role[ts:te]) == set(student_seq.role[ss:se])
                continue
            assert teacher.start_byte[ts] == student_seq.start_byte[ss] == start
            assert teacher.end_byte[te - 1] == student_seq.end_byte[se - 1] == end
            teacher_bytes = b"".join(teacher_vocab.token_bytes[i] for i in teacher.token_id[ts:te])
            student_bytes = b"".join(
                student_vocab.token_bytes[i] for i in student_seq.token_id[ss:se]
            )
            text = teacher.text[start:end]
            assert teacher_bytes == text
            # SentencePiece's first token of a segment carries the dummy prefix space, excluded from offsets.
            assert student_bytes in (text, b" " + text)


def test_byte_student_gets_a_chunk_end_at_every_teacher_token_end():
    split_inside_a_character = 0
    for document in documents():
        teacher, student_seq, _, _ = rendered_pair("bytes", document)
        chunks = align_sequences(teacher, student_seq)
        text_chunks = ~chunks.is_block
        positive = (teacher.role == None) & (teacher.end_byte > teacher.start_byte)  # noqa: E711
        teacher_ends = set(teacher.end_byte[positive].tolist())
        # Every teacher text-token end is a chunk end, except the one closing a text chunk at position 0 (chatml
        # has no bos: plain documents start with text on both sides, chat documents with a header block).
        if teacher.role[0] is None or student_seq.role[0] is None:
            teacher_ends -= {min(teacher_ends)}
        assert set(chunks.end_byte[text_chunks].tolist()) == teacher_ends
        assert ((chunks.teacher_end - chunks.teacher_start)[text_chunks] == 1).all()
        inner = [e for e in chunks.end_byte[text_chunks].tolist() if e < len(teacher.text)]
        split_inside_a_character += sum((teacher.text[e] & 0xC0) == 0x80 for e in inner)
    assert split_inside_a_character > 0  # SmolLM2 splits some emoji/CJK characters across tokens


@pytest.mark.parametrize("student", STUDENTS)
def test_truncated_sides_leave_only_the_aligned_prefix(student):
    document = plain_document("long", "test", 0, " ".join(texts()).encode())
    teacher, student_seq, _, _ = rendered_pair(student, document, teacher_max=64, student_max=80)
    chunks = align_sequences(teacher, student_seq, teacher.loss_spans)
    assert chunks.end_byte.max() <= min(len(teacher.text), len(student_seq.text))
    assert (chunks.teacher_end <= 64).all() and (chunks.student_end <= 80).all()
    logp = np.concatenate([[np.nan], np.full(63, -1.0)])
    targets = build_alm_targets(chunks, logp, np.full(64, np.log(0.05)), gamma=0.1)
    assert (
        targets.num_groups == 0
    )  # never a boundary above γ: the one trailing group is unterminated and dropped


def test_chat_templates_align_blocks_by_role_across_families():
    document = chat_document(
        "chat", "test", 0, [("user", b"Hi there!"), ("assistant", b"Hello, friend.")]
    )
    teacher, student_seq, _, _ = rendered_pair("sentencepiece", document)  # chatml against gemma
    chunks = align_sequences(teacher, student_seq, teacher.loss_spans)
    block_roles = [teacher.role[s] for s, b in zip(chunks.teacher_start, chunks.is_block) if b]
    # Loss region = the assistant text: its closing eot is trained, its header is not; chatml has no bos, so the
    # student's bos is dropped; a chat document has no eos after its final end-of-turn.
    assert block_roles == ["eot"]
    assert chunks.start_byte[~chunks.is_block].min() >= len(b"Hi there!")


# --- chat renderings: the loss region, boundary terms and truncated blocks (issue 8 items 4-5) --------------------

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# (teacher, student): chatml against llama3, gemma and chatml, and gemma/llama3 teachers against chatml.
CHAT_PAIRS = (
    ("smollm2", "bytes_llama3"),
    ("smollm2", "sentencepiece"),
    ("smollm2", "bpe"),
    ("sentencepiece", "smollm2"),
    ("bytes_llama3", "sentencepiece"),
)
DIALOGUE = [
    ("system", b"Answer briefly."),
    ("user", b"What is 2+2?"),
    ("assistant", b"It is 4."),
    ("user", "And in Japanese? 日本語".encode()),
    ("assistant", " 四 (yon).\n".encode()),
]
HEADERS = ("bos", "header:user", "header:assistant", "header:system")


@functools.cache
def chat_tokenizer_and_vocab(name: str):
    if name == "bytes_llama3":
        tokenizer = byte_tokenizer(specials=LLAMA3_SPECIALS)
        return tokenizer, vocab_from_tokenizer(tokenizer)
    return tokenizer_and_vocab(name)


def chat_pair(teacher_name, student_name, document, teacher_max=None, student_max=None):
    teacher_tok, teacher_vocab = chat_tokenizer_and_vocab(teacher_name)
    student_tok, student_vocab = chat_tokenizer_and_vocab(student_name)
    teacher = render(document, teacher_tok, teacher_vocab, max_length=teacher_max)
    student_seq = render(document, student_tok, student_vocab, max_length=student_max)
    return teacher, student_seq


@pytest.mark.parametrize(("teacher_name", "student_name"), CHAT_PAIRS)
@pytest.mark.parametrize("loss", ["assistant", "last_assistant", "all"])
def test_no_header_group_is_in_the_loss_and_block_groups_have_no_boundary_term(
    teacher_name, student_name, loss
):
    document = chat_document("chat", "test", 0, DIALOGUE, loss=loss)
    teacher, student_seq = chat_pair(teacher_name, student_name, document)
    chunks = align_sequences(teacher, student_seq, teacher.loss_spans)
    teacher_roles = [teacher.role[s] for s in chunks.teacher_start]
    student_roles = [student_seq.role[s] for s in chunks.student_start]
    trained_blocks = [r for r, b in zip(teacher_roles, chunks.is_block) if b]
    turns = {"assistant": 2, "last_assistant": 1, "all": 5}[loss]
    if loss == "all":
        # Every turn's eot, and the headers between two trained texts (not the first, before any text).
        assert trained_blocks.count("eot") == turns
        assert "header:assistant" in trained_blocks and "header:user" in trained_blocks
    else:
        # Only the eot closing each trained assistant turn: no header, although the next header sits at the same
        # byte offset as that eot.
        assert trained_blocks == ["eot"] * turns
        assert not {*teacher_roles, *student_roles} & set(HEADERS)
    rng = np.random.default_rng(0)
    logp = np.concatenate([[np.nan], -rng.exponential(1.0, size=len(teacher) - 1)])
    boundary = np.log(rng.uniform(0.01, 0.05, size=len(teacher)))  # below γ: only blocks end groups
    boundary[chunks.teacher_end - 1] = np.where(chunks.is_block, np.log(0.01), np.log(0.5))
    targets = build_alm_targets(chunks, logp, boundary, gamma=0.1)
    ends_on_block = np.isin(targets.teacher_group_end, chunks.teacher_end[chunks.is_block])
    assert ends_on_block.any()
    np.testing.assert_array_equal(targets.group_has_boundary_term, ~ends_on_block)
    for g in np.flatnonzero(ends_on_block):
        start, end = targets.teacher_group_start[g], targets.teacher_group_end[g]
        assert targets.teacher_group_logp[g] == pytest.approx(logp[start:end].sum(), rel=1e-6)
        group_roles = set(teacher.role[start:end]) | set(
            student_seq.role[targets.student_group_start[g] : targets.student_group_end[g]]
        )
        if loss != "all":
            assert not group_roles & set(HEADERS)


def complete_blocks(sequence, vocab, tokenizer):
    """Per block run of `sequence`: (role, its token ids, the family's whole block ids)."""
    from alm.templates import block_token_ids, family_for_tokenizer

    family = family_for_tokenizer(tokenizer)
    out = []
    pos = 0
    roles = list(sequence.role)
    while pos < len(roles):
        if roles[pos] is None:
            pos += 1
            continue
        end = pos
        while end < len(roles) and roles[end] == roles[pos]:
            end += 1
        whole = block_token_ids(family, roles[pos], tokenizer, vocab).tolist()
        out.append((pos, end, sequence.token_id[pos:end].tolist(), whole))
        pos = end
    return out


@pytest.mark.parametrize(("teacher_name", "student_name"), CHAT_PAIRS)
def test_truncated_blocks_are_never_matched(teacher_name, student_name):
    document = chat_document("chat", "test", 0, DIALOGUE, loss="all")
    teacher_tok, teacher_vocab = chat_tokenizer_and_vocab(teacher_name)
    student_tok, student_vocab = chat_tokenizer_and_vocab(student_name)
    full_teacher, full_student = chat_pair(teacher_name, student_name, document)
    cut_blocks = 0
    for teacher_max in range(2, len(full_teacher) + 1):
        # The student cut near the same text offset, one token either side.
        cut_byte = full_teacher.start_byte[min(teacher_max, len(full_teacher) - 1)]
        student_max = int(np.searchsorted(full_student.start_byte, cut_byte, side="right"))
        for student_cut in {max(1, student_max - 1), max(1, student_max), student_max + 1}:
            teacher, student_seq = chat_pair(
                teacher_name, student_name, document, teacher_max, student_cut
            )
            chunks = align_sequences(
                teacher, student_seq, teacher.loss_spans, keep_outside_loss=True
            )
            for side, vocab, tok, starts, ends in (
                (teacher, teacher_vocab, teacher_tok, chunks.teacher_start, chunks.teacher_end),
                (student_seq, student_vocab, student_tok, chunks.student_start, chunks.student_end),
            ):
                blocks = {
                    (s, e): (ids, whole) for s, e, ids, whole in complete_blocks(side, vocab, tok)
                }
                cut_blocks += sum(ids != whole for ids, whole in blocks.values())
                for s, e in zip(starts[chunks.is_block], ends[chunks.is_block]):
                    ids, whole = blocks[(int(s), int(e))]
                    assert ids == whole, (teacher_max, student_cut)
    assert cut_blocks > 0  # some cuts fell inside a block
