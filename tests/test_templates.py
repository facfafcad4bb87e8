"""alm.templates: rendering plain and chat documents per family, loss spans, truncation, stage-two inverses.

References: the expected token sequences are spelled out as the family's template *strings* (ALM_SPEC §3) and
tokenized in one piece by the tokenizer itself; offsets are checked by slicing the content text.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from factories import (
    bpe_tokenizer,
    byte_tokenizer,
    corpus_texts,
    sentencepiece_tokenizer,
    smollm2_tokenizer,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from alm.errors import ConfigError, DataError, TokenizerRefusedError
from alm.templates import (
    Document,
    Segment,
    chat_document,
    document_from_parts,
    document_from_stored,
    family_for_tokenizer,
    merge_spans,
    plain_document,
    render,
    sequence_from_ids,
    sequence_from_stored,
    token_in_loss,
)
from alm.vocab import vocab_from_tokenizer

LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")


def llama3_bytes():
    tok = byte_tokenizer(specials=LLAMA3_SPECIALS)
    return tok


def gemma_sp():
    return sentencepiece_tokenizer(model_type="unigram", specials=GEMMA_SPECIALS)


CASES = {
    "smollm2_chatml": smollm2_tokenizer,
    "bpe_chatml": bpe_tokenizer,
    "bytes_chatml": byte_tokenizer,
    "bytes_llama3": llama3_bytes,
    "sp_gemma": gemma_sp,
    "sp_plain": sentencepiece_tokenizer,
}
EXPECTED_FAMILY = {
    "smollm2_chatml": "chatml",
    "bpe_chatml": "chatml",
    "bytes_chatml": "chatml",
    "bytes_llama3": "llama3",
    "sp_gemma": "gemma",
    "sp_plain": "plain",
}
_VOCABS = {}


def setup(case):
    tok = CASES[case]()
    if case not in _VOCABS:
        _VOCABS[case] = vocab_from_tokenizer(tok)
    return tok, _VOCABS[case]


def ids_of(tok, string: str) -> list[int]:
    return tok(string, add_special_tokens=False)["input_ids"]


MESSAGES = [
    ("system", b"Be brief."),
    ("user", b"Hi there, what is 2+2?"),
    ("assistant", b"It is 4."),
    ("user", b"And 3+3?"),
    ("assistant", b"6."),
]


def check_offsets(seq, vocab):
    """Text tokens tile the content text exactly; block tokens have zero width."""
    text_tokens = [i for i, r in enumerate(seq.role) if r is None]
    pieces = []
    for i in text_tokens:
        s, e = seq.start_byte[i], seq.end_byte[i]
        pieces.append(seq.text[s:e])
        tb = vocab.token_bytes[seq.token_id[i]]
        assert seq.text[s:e] in (tb, tb[1:])  # [1:]: a SentencePiece dummy prefix
    assert b"".join(pieces) == seq.text
    for i, r in enumerate(seq.role):
        if r is not None:
            assert seq.start_byte[i] == seq.end_byte[i]


@pytest.mark.parametrize("case", list(CASES))
def test_family_is_detected_from_special_tokens(case):
    tok, vocab = setup(case)
    assert family_for_tokenizer(tok) == EXPECTED_FAMILY[case]
    assert family_for_tokenizer(vocab) == EXPECTED_FAMILY[case]


def test_chatml_render_equals_template_string_tokenized_whole():
    tok, vocab = setup("smollm2_chatml")
    doc = chat_document("d", "s", 0, MESSAGES)
    seq = render(doc, tok, vocab)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there, what is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6.<|im_end|>\n"
    )
    assert seq.token_id.tolist() == ids_of(tok, expected)
    assert seq.text == b"".join(m for _, m in MESSAGES)
    check_offsets(seq, vocab)
    # No bos block tokens in chatml, but the segment is recorded with zero tokens.
    assert seq.segments[0] == {
        "role": "bos",
        "start_byte": 0,
        "end_byte": 0,
        "start_pos": 0,
        "end_pos": 0,
    }


def test_no_system_prompt_is_injected_by_the_family():
    tok, vocab = setup("smollm2_chatml")
    doc = chat_document("d", "s", 0, [("user", b"Hi"), ("assistant", b"Hello")])
    seq = render(
        doc, tok, vocab, "chatml"
    )  # `auto` takes SmolLM2's own template (test_chat_template_family)
    assert "header:system" not in set(seq.role)
    assert seq.token_id.tolist() == ids_of(
        tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    )


def test_llama3_render_equals_template_string():
    tok, vocab = setup("bytes_llama3")
    doc = chat_document("d", "s", 0, MESSAGES[:3])
    seq = render(doc, tok, vocab)
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there, what is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
    )
    assert seq.token_id.tolist() == ids_of(tok, expected)
    check_offsets(seq, vocab)


def test_gemma_maps_system_to_user_and_assistant_to_model():
    tok, vocab = setup("sp_gemma")
    doc = chat_document("d", "s", 0, MESSAGES[:3])
    seq = render(doc, tok, vocab)
    blocks = {}
    for i, r in enumerate(seq.role):
        if r is not None:
            blocks.setdefault(r, []).append(int(seq.token_id[i]))
    n_sys = len(ids_of(tok, "<start_of_turn>user\n"))
    assert blocks["header:system"] == ids_of(tok, "<start_of_turn>user\n")
    assert blocks["header:user"] == ids_of(tok, "<start_of_turn>user\n")
    assert blocks["header:assistant"] == ids_of(tok, "<start_of_turn>model\n")
    assert blocks["eot"] == ids_of(tok, "<end_of_turn>\n") * 3
    assert blocks["bos"] == [tok.bos_token_id] and "eos" not in blocks
    assert n_sys > 1
    check_offsets(seq, vocab)


CHAT_CASES = ("smollm2_chatml", "bytes_llama3", "sp_gemma")
END_OF_TURN = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}


@pytest.mark.parametrize("case", CHAT_CASES)
@pytest.mark.parametrize("num_messages", [2, 3, 4, 5])
def test_chat_documents_end_on_the_final_end_of_turn_with_no_eos(case, num_messages):
    """tokenkit's `direct_encode` appends eos only when the text does not already end with eot (ALM_SPEC §3)."""
    tok, vocab = setup(case)
    seq = render(chat_document("d", "s", 0, MESSAGES[:num_messages]), tok, vocab)
    end_of_turn = ids_of(tok, END_OF_TURN[family_for_tokenizer(tok)])
    assert seq.token_id[-len(end_of_turn) :].tolist() == end_of_turn
    assert seq.segments[-1]["role"] == "eot" and seq.segments[-1]["end_pos"] == len(seq)
    assert "eos" not in {s["role"] for s in seq.segments}
    assert "eos" not in set(seq.role)


@pytest.mark.parametrize("case", list(CASES))
def test_plain_document_is_bos_text_eos(case):
    tok, vocab = setup(case)
    text = corpus_texts(3, seed=5)[1].encode()
    seq = render(plain_document("d", "s", 0, text), tok, vocab)
    assert seq.text == text and not seq.truncated
    assert seq.loss_spans.tolist() == [[0, len(text)]]
    roles = [s["role"] for s in seq.segments]
    assert roles == ["bos", "text", "eos"]
    check_offsets(seq, vocab)
    family = family_for_tokenizer(tok)
    eos = {"chatml": "<|endoftext|>", "llama3": "<|end_of_text|>"}.get(family, tok.eos_token)
    assert vocab.special_text[int(seq.token_id[-1])] == eos
    if family == "chatml":
        assert seq.role[0] is None  # no bos
    else:
        assert seq.role[0] == "bos"


@pytest.mark.parametrize("loss", ["all", "assistant", "last_assistant"])
def test_loss_spans_by_region(loss):
    tok, vocab = setup("bpe_chatml")
    seq = render(chat_document("d", "s", 0, MESSAGES, loss=loss), tok, vocab)
    starts = np.cumsum([0] + [len(m) for _, m in MESSAGES]).tolist()
    expected = {
        "all": [[0, starts[-1]]],
        "assistant": [[starts[2], starts[3]], [starts[4], starts[5]]],
        "last_assistant": [[starts[4], starts[5]]],
    }[loss]
    assert seq.loss_spans.tolist() == expected


def trained_blocks(seq) -> list[str]:
    """The block runs of `seq` that `token_in_loss` puts in the loss, in order (one entry per run)."""
    in_loss = token_in_loss(seq.start_byte, seq.end_byte, seq.role, seq.loss_spans)
    runs = []
    for pos, role in enumerate(seq.role):
        if role is None or (pos > 0 and seq.role[pos - 1] == role):
            continue
        end = pos
        while end < len(seq) and seq.role[end] == role:
            assert in_loss[end] == in_loss[pos]  # a block is in or out as a whole
            end += 1
        if in_loss[pos]:
            runs.append(role)
    return runs


@pytest.mark.parametrize("case", CHAT_CASES)
def test_turn_closing_eot_is_in_loss_and_the_next_header_is_not(case):
    """Segment order decides, not byte offset: a trained turn's eot and the next turn's header share one offset."""
    tok, vocab = setup(case)
    seq = render(chat_document("d", "s", 0, MESSAGES, loss="assistant"), tok, vocab)
    in_loss = token_in_loss(seq.start_byte, seq.end_byte, seq.role, seq.loss_spans)
    trained_text = b"".join(
        seq.text[s:e] for s, e, r, m in zip(seq.start_byte, seq.end_byte, seq.role, in_loss) if m
    )
    assert trained_text == b"It is 4.6."
    assert trained_blocks(seq) == ["eot", "eot"]
    ((_, first_end), _) = seq.loss_spans.tolist()
    segs = [(s["role"], s["start_byte"]) for s in seq.segments]
    assert ("eot", first_end) in segs and ("header:user", first_end) in segs  # same offset
    last = render(chat_document("d", "s", 0, MESSAGES, loss="last_assistant"), tok, vocab)
    assert trained_blocks(last) == ["eot"]
    everything = render(chat_document("d", "s", 0, MESSAGES, loss="all"), tok, vocab)
    # Every eot, and every header between two trained texts (not bos or the first header, before any text).
    headers = ["header:user", "header:assistant", "header:user", "header:assistant"]
    assert trained_blocks(everything) == [x for pair in zip(["eot"] * 4, headers) for x in pair] + [
        "eot"
    ]


def test_the_loss_region_rule_has_one_definition():
    from alm import templates
    from alm.align import chunks
    from alm.train import batch

    assert batch.token_in_loss is token_in_loss
    # the alignment applies the rule's two halves to a micro-batch at once: the very functions it is made of
    assert {"text_in_spans", "blocks_in_loss"} <= set(token_in_loss.__code__.co_names)
    assert chunks.text_in_spans is templates.text_in_spans
    assert chunks.blocks_in_loss is templates.blocks_in_loss


def test_text_tokens_are_in_the_loss_by_byte_span_and_zero_width_ones_by_what_follows():
    start = np.array([0, 2, 4, 4, 6, 9])
    end = np.array([2, 4, 4, 6, 9, 9])
    # [2, 6) and [6, 9) touch: their union is one region; the zero-width token at 4 belongs to [4, 6).
    assert token_in_loss(start, end, None, [(2, 6), (6, 9)]).tolist() == [
        False,
        True,
        True,
        True,
        True,
        False,  # zero width at the end of the region: it belongs to untrained text after it
    ]
    assert token_in_loss(start, end, None, np.zeros((0, 2))).tolist() == [False] * 6


def test_literal_special_strings_in_user_text_stay_text():
    tok, vocab = setup("smollm2_chatml")
    user = b"please print <|im_start|>assistant\n and <|im_end|> literally"
    document = chat_document("d", "s", 0, [("user", user), ("assistant", b"ok")])
    seq = render(document, tok, vocab, "chatml")
    text_ids = seq.token_id[[r is None for r in seq.role]]
    assert not vocab.is_special[text_ids].any()
    assert vocab.is_special[seq.token_id].sum() == 4  # 2 headers + 2 eot
    assert seq.text == user + b"ok"
    check_offsets(seq, vocab)


@pytest.mark.parametrize("case", ["smollm2_chatml", "sp_gemma", "bytes_llama3"])
@pytest.mark.parametrize("max_length", [1, 2, 5, 9, 17, 30])
def test_truncation_cuts_tokens_text_segments_and_spans(case, max_length):
    tok, vocab = setup(case)
    doc = chat_document("d", "s", 0, MESSAGES, loss="all")
    full = render(doc, tok, vocab)
    seq = render(doc, tok, vocab, max_length=max_length)
    assert seq.truncated == (len(full) > max_length)
    assert len(seq) == min(max_length, len(full))
    assert seq.token_id.tolist() == full.token_id[: len(seq)].tolist()
    assert list(seq.role) == list(full.role[: len(seq)])
    # Text ends exactly where the kept text tokens end.
    text_end = max([0, *(int(e) for e, r in zip(seq.end_byte, seq.role) if r is None)])
    assert len(seq.text) >= text_end and full.text.startswith(seq.text)
    if seq.truncated:
        assert len(seq.text) == full.start_byte[max_length]
    check_offsets(seq, vocab)
    assert all(s["end_pos"] <= len(seq) and s["end_byte"] <= len(seq.text) for s in seq.segments)
    assert all(0 <= a < b <= len(seq.text) for a, b in seq.loss_spans.tolist())
    positions = [(s["start_pos"], s["end_pos"]) for s in seq.segments]
    assert positions[0][0] == 0 and positions[-1][1] == len(seq)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(positions))


@pytest.mark.parametrize("case", ["smollm2_chatml", "sp_plain", "bytes_chatml"])
def test_long_text_truncation_matches_full_tokenization_prefix(case):
    tok, vocab = setup(case)
    text = "\n\n".join(corpus_texts(300, seed=3)).encode()
    assert len(text) > 20_000
    doc = plain_document("d", "s", 0, text)
    full = render(doc, tok, vocab)
    for max_length in (16, 257):
        seq = render(doc, tok, vocab, max_length=max_length)
        assert seq.truncated
        assert seq.token_id.tolist() == full.token_id[:max_length].tolist()
        np.testing.assert_array_equal(seq.end_byte, full.end_byte[:max_length])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("max_length", [None, 7, 40])
def test_sequence_from_ids_rebuilds_render_offsets(case, max_length):
    tok, vocab = setup(case)
    if family_for_tokenizer(tok) == "plain":
        doc = plain_document("d", "s", 0, "plain text with ünïcode 😀 and\ttabs".encode())
    else:
        doc = chat_document("d", "s", 0, MESSAGES, loss="assistant")
    seq = render(doc, tok, vocab, max_length=max_length)
    again = sequence_from_ids(vocab, seq.token_id, seq.text, seq.segments, seq.loss_spans)
    np.testing.assert_array_equal(again.start_byte, seq.start_byte)
    np.testing.assert_array_equal(again.end_byte, seq.end_byte)
    assert list(again.role) == list(seq.role)
    np.testing.assert_array_equal(again.loss_spans, seq.loss_spans)


def test_sequence_from_stored_reads_a_stored_sequence_object():
    tok, vocab = setup("bpe_chatml")
    seq = render(chat_document("d", "s", 0, MESSAGES), tok, vocab)

    class Stored:
        token_id = seq.token_id
        text = seq.text
        segments = seq.segments
        loss_spans = seq.loss_spans
        truncated = False
        doc_id, source, row = "d", "s", 0

    again = sequence_from_stored(Stored(), vocab)
    np.testing.assert_array_equal(again.end_byte, seq.end_byte)
    doc = document_from_stored(Stored())
    assert (doc.doc_id, doc.source, doc.row) == ("d", "s", 0)
    assert render(doc, tok, vocab).token_id.tolist() == seq.token_id.tolist()


def test_sequence_from_ids_rejects_ids_that_do_not_match_text():
    tok, vocab = setup("bpe_chatml")
    seq = render(plain_document("d", "s", 0, b"hello world"), tok, vocab)
    with pytest.raises(TokenizerRefusedError):
        sequence_from_ids(vocab, seq.token_id, b"hello there", seq.segments)
    broken = [dict(s) for s in seq.segments]
    broken[-1]["start_pos"] += 1
    with pytest.raises(DataError, match="segment"):
        sequence_from_ids(vocab, seq.token_id, seq.text, broken)


@pytest.mark.parametrize("student", ["sp_gemma", "bytes_llama3", "smollm2_chatml"])
def test_student_rerender_of_stored_document_keeps_text_roles_and_loss(student):
    teacher_tok, teacher_vocab = setup("bpe_chatml")
    doc = chat_document("d", "s", 0, MESSAGES, loss="last_assistant")
    stored = render(doc, teacher_tok, teacher_vocab)
    abstract = document_from_parts(stored.text, stored.segments, stored.loss_spans)
    assert [s.role for s in abstract.segments] == [s.role for s in doc.segments]
    assert [s.in_loss for s in abstract.segments if s.role == "text"] == [
        s.in_loss for s in doc.segments if s.role == "text"
    ]
    tok, vocab = setup(student)
    seq = render(abstract, tok, vocab)
    assert seq.text == stored.text
    np.testing.assert_array_equal(seq.loss_spans, stored.loss_spans)
    check_offsets(seq, vocab)
    block_roles = [s["role"] for s in seq.segments if s["role"] != "text"]
    assert block_roles == [s["role"] for s in stored.segments if s["role"] != "text"]


def test_plain_family_refuses_chat_documents():
    tok, vocab = setup("sp_plain")
    with pytest.raises(ConfigError, match="plain"):
        render(chat_document("d", "s", 0, MESSAGES[:2]), tok, vocab)


def test_family_without_its_special_tokens_is_refused():
    tok, vocab = setup("smollm2_chatml")
    with pytest.raises(TokenizerRefusedError, match="begin_of_text"):
        render(chat_document("d", "s", 0, MESSAGES[:2]), tok, vocab, family="llama3")
    with pytest.raises(ConfigError, match="unknown"):
        render(plain_document("d", "s", 0, b"x"), tok, vocab, family="mistral")


def test_unknown_chat_role_is_a_data_error():
    with pytest.raises(DataError, match="tool"):
        chat_document("d", "s", 0, [("tool", b"x")])


def test_empty_segments_render_no_tokens_but_keep_structure():
    tok, vocab = setup("bpe_chatml")
    doc = Document(
        "d", "s", 0, (Segment("header:user"), Segment("text", b"", True), Segment("eot"))
    )
    seq = render(doc, tok, vocab)
    assert seq.text == b"" and seq.loss_spans.shape == (0, 2)
    assert [s["role"] for s in seq.segments] == ["header:user", "text", "eot"]


@settings(max_examples=25, deadline=None)
@given(
    spans=st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50)).map(sorted).map(tuple), max_size=8
    )
)
def test_merge_spans_is_the_union_of_non_empty_spans(spans):
    merged = merge_spans(spans)
    covered = {x for a, b in spans for x in range(a, b)}
    assert {x for a, b in merged.tolist() for x in range(a, b)} == covered
    assert all(b > a for a, b in merged.tolist())
    assert all(m1[1] < m2[0] for m1, m2 in zip(merged.tolist(), merged.tolist()[1:]))


_message_text = (
    st.lists(st.sampled_from([*"ab cé\n\t😀<|>_", "<|im_start|>", "<s>", "  "]), max_size=12)
    .map("".join)
    .map(str.encode)
)


@pytest.mark.parametrize("case", ["smollm2_chatml", "sp_gemma", "bytes_llama3"])
@settings(max_examples=20, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.sampled_from(["system", "user", "assistant"]), _message_text),
        min_size=1,
        max_size=5,
    ),
    loss=st.sampled_from(["all", "assistant", "last_assistant"]),
    max_length=st.one_of(st.none(), st.integers(1, 40)),
)
def test_random_chat_documents_render_exactly_and_rebuild_from_ids(
    case, messages, loss, max_length
):
    tok, vocab = setup(case)
    doc = chat_document("d", "s", 0, messages, loss=loss)
    seq = render(doc, tok, vocab, max_length=max_length)
    assert doc.content_text.startswith(seq.text)
    check_offsets(seq, vocab)
    again = sequence_from_ids(vocab, seq.token_id, seq.text, seq.segments, seq.loss_spans)
    np.testing.assert_array_equal(again.start_byte, seq.start_byte)
    np.testing.assert_array_equal(again.end_byte, seq.end_byte)
    assert list(again.role) == list(seq.role)
    if not seq.truncated:
        rerendered = render(document_from_parts(seq.text, seq.segments, seq.loss_spans), tok, vocab)
        assert rerendered.token_id.tolist() == seq.token_id.tolist()
        np.testing.assert_array_equal(rerendered.loss_spans, seq.loss_spans)
    # The loss region: no header or bos unless every kept text is trained (`loss: all`, or a dialogue whose turns
    # are all trained); an eot iff the turn it closes is trained.
    in_loss = token_in_loss(seq.start_byte, seq.end_byte, seq.role, seq.loss_spans)
    segment_of = {}
    for index, s in enumerate(seq.segments):
        for pos in range(s["start_pos"], s["end_pos"]):
            segment_of[pos] = index
    trained_turns = [seg.in_loss and bool(seg.text) for seg in doc.segments if seg.role == "text"]
    for pos, role in enumerate(seq.role):
        if role is None:
            continue
        index = segment_of[pos]
        turn = sum(s["role"] == "text" for s in seq.segments[:index])  # texts before this block
        if role == "eot":
            closed = seq.segments[index - 1]
            if (
                closed["end_byte"] > closed["start_byte"]
            ):  # an eot closing kept text: trained iff it is
                assert in_loss[pos] == trained_turns[turn - 1], pos
        elif turn == 0 or not in_loss[[r is None for r in seq.role]].all():
            assert not in_loss[pos], (pos, role)
