"""alm.vocab: byte tables, exact-bytes encoding, refusals, boundary classes, fingerprint, Arrow round trip.

References are independent of `alm.vocab`: transformers' own GPT-2 byte table, the `sentencepiece` library's piece
table, and slicing the text by the returned offsets.
"""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factories import (
    SENTENCEPIECE_UNSAFE_TEXT,
    TRICKY_TEXTS,
    bpe_tokenizer,
    byte_tokenizer,
    corpus_texts,
    sentencepiece_model_bytes,
    sentencepiece_tokenizer,
    smollm2_tokenizer,
    training_texts,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from alm.errors import DataError, TokenizerRefusedError
from alm.vocab import (
    Vocab,
    build_byte_tokenizer,
    complete_utf8_prefix,
    encode_text,
    gpt2_bytes_to_unicode,
    token_offsets,
    vocab_from_tokenizer,
    without_unicode_normalizer,
)

GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")

TOKENIZERS = {
    "bpe": lambda: bpe_tokenizer(),
    "sp_bpe": lambda: sentencepiece_tokenizer(),
    "sp_unigram": lambda: sentencepiece_tokenizer(model_type="unigram", specials=GEMMA_SPECIALS),
    "bytes": lambda: byte_tokenizer(),
    "smollm2": lambda: smollm2_tokenizer(),
}
EXPECTED_KIND = {
    "bpe": "byte_level_bpe",
    "sp_bpe": "sentencepiece",
    "sp_unigram": "sentencepiece",
    "bytes": "bytes",
    "smollm2": "byte_level_bpe",
}
_VOCABS: dict[str, Vocab] = {}


def tok_and_vocab(kind: str):
    tok = TOKENIZERS[kind]()
    if kind not in _VOCABS:
        _VOCABS[kind] = vocab_from_tokenizer(tok)
    return tok, _VOCABS[kind]


def assert_exact(vocab: Vocab, text: bytes, enc) -> None:
    """Every token covers exactly its own bytes (minus a dummy space) and the tokens tile the text."""
    body = text[: enc.num_bytes]
    assert b"".join(body[s:e] for s, e in zip(enc.start_byte, enc.end_byte)) == body
    assert np.all(enc.start_byte[1:] == enc.end_byte[:-1])
    if len(enc):
        assert enc.start_byte[0] == 0 and enc.end_byte[-1] == len(body)
    for i, (token_id, s, e) in enumerate(zip(enc.token_id, enc.start_byte, enc.end_byte)):
        expected = vocab.token_bytes[token_id]
        if i == 0 and enc.dummy_prefix:
            assert expected[:1] == b" "
            expected = expected[1:]
        assert body[s:e] == expected


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_vocab_kind_is_detected(kind):
    _, vocab = tok_and_vocab(kind)
    assert vocab.kind == EXPECTED_KIND[kind]


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=range(len(TRICKY_TEXTS)))
def test_token_bytes_concatenate_to_tricky_text(kind, text):
    tok, vocab = tok_and_vocab(kind)
    raw = text.encode("utf-8")
    enc = encode_text(tok, vocab, raw)
    assert enc.num_bytes == len(raw)
    assert_exact(vocab, raw, enc)
    assert not vocab.is_special[enc.token_id].any()


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_encode_text_ids_equal_the_tokenizers_own_call(kind):
    tok, vocab = tok_and_vocab(kind)
    for text in (*TRICKY_TEXTS, *corpus_texts(10, seed=3)):
        expected = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert encode_text(tok, vocab, text.encode()).token_id.tolist() == expected
    # Afterwards a normal call still recognises special tokens (block rendering relies on it).
    special = next(t for t in tok.added_tokens_decoder.values() if t.special).content
    assert vocab.is_special[tok(special, add_special_tokens=False)["input_ids"]].all()


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_token_bytes_concatenate_to_corpus_texts(kind):
    tok, vocab = tok_and_vocab(kind)
    for text in corpus_texts(40, seed=7):
        raw = text.encode("utf-8")
        enc = encode_text(tok, vocab, raw)
        assert_exact(vocab, raw, enc)


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
_mixed = st.lists(
    st.one_of(
        _text,
        st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "😀", "é", "日本", "<|im_start|>", "<s>"]),
    ),
    max_size=8,
).map("".join)


def missing_single_bytes(vocab: Vocab) -> set[int]:
    return set(range(256)) - {b[0] for b in vocab.token_bytes if len(b) == 1}


def test_smollm2_refuses_a_character_it_silently_drops():
    tok, vocab = tok_and_vocab("smollm2")
    assert 0x16 in missing_single_bytes(vocab)
    assert tok("a\x16b", add_special_tokens=False)["input_ids"] == [
        vocab.bytes_to_id[b"a"],
        vocab.bytes_to_id[b"b"],
    ]
    with pytest.raises(TokenizerRefusedError, match="does not reproduce"):
        encode_text(tok, vocab, b"a\x16b")


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@settings(max_examples=40, deadline=None)
@given(text=_mixed)
def test_random_text_round_trips_through_token_bytes(kind, text):
    tok, vocab = tok_and_vocab(kind)
    if vocab.kind == "sentencepiece" and "\u2581" in text:
        return  # a literal ▁ is a space to SentencePiece; refused (see test below)
    raw = text.encode("utf-8")
    if set(raw) & missing_single_bytes(vocab):
        # e.g. SmolLM2 has no token for byte 0x16: its tokenizer silently drops the character; we refuse.
        with pytest.raises(TokenizerRefusedError):
            encode_text(tok, vocab, raw)
        return
    enc = encode_text(tok, vocab, raw)
    assert_exact(vocab, raw, enc)
    again = token_offsets(vocab, enc.token_id, raw)
    np.testing.assert_array_equal(again.start_byte, enc.start_byte)
    np.testing.assert_array_equal(again.end_byte, enc.end_byte)


def test_gpt2_table_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert gpt2_bytes_to_unicode() == bytes_to_unicode()


def test_byte_level_table_matches_gpt2_alphabet_for_smollm2():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok, vocab = tok_and_vocab("smollm2")
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    assert vocab.size == 49152
    pieces = tok.convert_ids_to_tokens(list(range(vocab.size)))
    for token_id in [*range(17, 400), *range(49000, 49152)]:
        assert vocab.token_bytes[token_id] == bytes(inverse[c] for c in pieces[token_id])
    assert vocab.is_special[:17].all() and not vocab.is_special[17:].any()
    assert all(vocab.token_bytes[i] == b"" for i in range(17))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_table_matches_sentencepiece_library(model_type):
    import sentencepiece as spm

    specials = GEMMA_SPECIALS if model_type == "unigram" else ()
    tok = sentencepiece_tokenizer(model_type=model_type, specials=specials)
    vocab = vocab_from_tokenizer(tok)
    sp = spm.SentencePieceProcessor(
        model_proto=sentencepiece_model_bytes(600, model_type, specials)
    )
    assert vocab.size == sp.get_piece_size()
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            assert vocab.is_special[i] and vocab.token_bytes[i] == b""
        elif sp.is_byte(i):
            assert vocab.token_bytes[i] == bytes([int(piece[3:5], 16)])
            assert vocab.is_byte_fallback[i]
        else:
            assert vocab.token_bytes[i] == piece.replace("\u2581", " ").encode("utf-8")
    assert vocab.special_role[0] == "unk" and vocab.special_role[1] == "bos"
    assert vocab.special_role[2] == "eos"
    assert vocab.special_role[3] == "<start_of_turn>" if specials else True


def test_duplicate_bytes_prefer_literal_token_over_byte_fallback():
    _, vocab = tok_and_vocab("sp_bpe")
    fallback_ids = np.flatnonzero(vocab.is_byte_fallback)
    assert len(fallback_ids) == 256
    collisions = 0
    for token_id in fallback_ids:
        literal = [
            i
            for i, b in enumerate(vocab.token_bytes)
            if b == vocab.token_bytes[token_id] and not vocab.is_byte_fallback[i]
        ]
        if literal:
            collisions += 1
            assert vocab.bytes_to_id[vocab.token_bytes[token_id]] == literal[0]
        else:
            assert vocab.bytes_to_id[vocab.token_bytes[token_id]] == token_id
    assert collisions > 50  # ASCII letters exist both as pieces and as <0xNN>


def test_sentencepiece_dummy_prefix_is_excluded_from_offsets():
    tok, vocab = tok_and_vocab("sp_bpe")
    enc = encode_text(tok, vocab, b"hello world")
    assert enc.dummy_prefix
    assert enc.start_byte[0] == 0
    assert vocab.token_bytes[enc.token_id[0]].startswith(b" ")
    assert_exact(vocab, b"hello world", enc)
    # A lone dummy ▁ token (before a newline) has zero width.
    enc = encode_text(tok, vocab, b"\nx")
    assert enc.dummy_prefix
    assert vocab.token_bytes[enc.token_id[0]] == b" "
    assert enc.start_byte[0] == enc.end_byte[0] == 0
    assert_exact(vocab, b"\nx", enc)


def test_byte_level_bpe_has_no_dummy_prefix():
    tok, vocab = tok_and_vocab("smollm2")
    enc = encode_text(tok, vocab, b"hello world")
    assert not enc.dummy_prefix
    assert [vocab.token_bytes[i] for i in enc.token_id] == [b"hello", b" world"]
    assert enc.start_byte.tolist() == [0, 5] and enc.end_byte.tolist() == [5, 11]


def test_trailing_partial_utf8_character_is_not_tokenized():
    tok, vocab = tok_and_vocab("smollm2")
    full = "héllo 😀".encode()
    for cut in (1, 2, 3):
        text = full[:-cut]
        enc = encode_text(tok, vocab, text)
        assert enc.num_bytes == len(full) - 4
        assert_exact(vocab, text, enc)
    assert complete_utf8_prefix("é".encode()[:1]) == 0
    assert complete_utf8_prefix(b"abc") == 3


def test_invalid_utf8_inside_text_is_a_data_error():
    tok, vocab = tok_and_vocab("bpe")
    with pytest.raises(DataError, match="byte offset 3"):
        encode_text(tok, vocab, b"abc\xff\xfedef")


def test_literal_special_strings_in_text_stay_text():
    for kind in ("bpe", "smollm2", "bytes"):
        tok, vocab = tok_and_vocab(kind)
        raw = b"<|im_start|>user\n<|im_end|><|endoftext|>"
        enc = encode_text(tok, vocab, raw)
        assert not vocab.is_special[enc.token_id].any()
        assert_exact(vocab, raw, enc)


def test_sentencepiece_refuses_literal_lower_one_eighth_block():
    tok, vocab = tok_and_vocab("sp_bpe")
    with pytest.raises(TokenizerRefusedError, match="does not reproduce the bytes"):
        encode_text(tok, vocab, SENTENCEPIECE_UNSAFE_TEXT.encode())
    btok, bvocab = tok_and_vocab("bpe")
    assert_exact(
        bvocab,
        SENTENCEPIECE_UNSAFE_TEXT.encode(),
        encode_text(btok, bvocab, SENTENCEPIECE_UNSAFE_TEXT.encode()),
    )


def test_token_offsets_refuses_ids_that_are_not_the_text():
    tok, vocab = tok_and_vocab("bpe")
    enc = encode_text(tok, vocab, b"hello world")
    with pytest.raises(TokenizerRefusedError, match="differ at byte"):
        token_offsets(vocab, enc.token_id, b"hello there")


# ---------------------------------------------------------------------------------------------------------------
# Refusals: tokenizers built in-process


def _bpe_with(normalizer=None, name="custom", model="bpe"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = training_texts(200)
    if model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=["[UNK]"], show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.name_or_path = name
    return hf


@pytest.mark.parametrize(
    ("normalizer_name", "reason"),
    [("Lowercase", "lower-casing"), ("NFKC", "NFKC"), ("NFC", "NFC"), ("Sequence", "NFD")],
)
def test_byte_changing_normalizers_are_refused(normalizer_name, reason):
    from tokenizers import normalizers

    normalizer = {
        "Lowercase": normalizers.Lowercase(),
        "NFKC": normalizers.NFKC(),
        "NFC": normalizers.NFC(),
        "Sequence": normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()]),
    }[normalizer_name]
    tok = _bpe_with(normalizer, name=f"bpe-{normalizer_name}")
    with pytest.raises(TokenizerRefusedError, match=reason) as info:
        vocab_from_tokenizer(tok)
    assert f"bpe-{normalizer_name}" in str(info.value)


def test_unicode_normalizer_can_be_stripped_explicitly():
    from tokenizers import normalizers

    tok = _bpe_with(normalizers.NFC(), name="bpe-nfc")
    stripped = without_unicode_normalizer(tok)
    vocab = vocab_from_tokenizer(stripped)
    raw = "e\u0301 stays decomposed".encode()
    assert_exact(vocab, raw, encode_text(stripped, vocab, raw))
    with pytest.raises(TokenizerRefusedError):
        vocab_from_tokenizer(tok)  # the original is untouched


def test_wordpiece_is_refused():
    tok = _bpe_with(name="bert-like", model="wordpiece")
    with pytest.raises(TokenizerRefusedError, match="WordPiece") as info:
        vocab_from_tokenizer(tok)
    assert "bert-like" in str(info.value)


def _metaspace_bpe_without_byte_fallback():
    """A SentencePiece-style BPE without byte fallback whose alphabet covers the probe texts but not 'Ω'."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import alm.vocab

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(alm.vocab._PROBE_TEXTS + tuple(training_texts(200)))) - {"Ω"})
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=[AddedToken("<unk>", special=True)],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator([t.replace("Ω", "") for t in training_texts(200)], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    hf.name_or_path = "no-byte-fallback"
    return hf


def test_unk_at_encode_time_is_refused():
    tok = _metaspace_bpe_without_byte_fallback()
    vocab = vocab_from_tokenizer(tok)  # passes the probes
    with pytest.raises(TokenizerRefusedError, match="produced <unk>") as info:
        encode_text(tok, vocab, "omega Ω sign".encode())
    assert "no-byte-fallback" in str(info.value)


def test_unk_on_probe_text_is_refused_at_construction():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[AddedToken("<unk>", special=True)], show_progress=False
    )
    tok.train_from_iterator(["plain ascii text only"] * 10, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(TokenizerRefusedError, match="<unk>"):
        vocab_from_tokenizer(hf)


# ---------------------------------------------------------------------------------------------------------------
# Specials, boundary classes, fingerprint, Arrow


def _reference_class(token_bytes: bytes, special: bool) -> int:
    if special:
        return 4
    if not token_bytes:
        return -1
    return {0x20: 0, 0x0A: 1, 0x09: 2, 0x0B: 3, 0x0C: 3, 0x0D: 3}.get(token_bytes[0], -1)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_boundary_classes_follow_first_byte_and_specials(kind):
    tok, vocab = tok_and_vocab(kind)
    added = tok.added_tokens_decoder
    for token_id in range(vocab.size):
        special = token_id in added and added[token_id].special
        assert vocab.is_special[token_id] == special
        assert vocab.boundary_class[token_id] == _reference_class(
            vocab.token_bytes[token_id], special
        )
    assert vocab.boundary_class.dtype == np.int8
    mask = vocab.boundary_mask([0, 4])
    np.testing.assert_array_equal(mask, (vocab.boundary_class == 0) | (vocab.boundary_class == 4))
    assert (vocab.boundary_class == 0).any() and (vocab.boundary_class == 1).any()


def test_smollm2_special_roles():
    _, vocab = tok_and_vocab("smollm2")
    assert vocab.special_role[1] == "<|im_start|>"
    assert vocab.special_role[2] == "<|im_end|>"
    assert vocab.special_role[0] == "unk"  # SmolLM2 names <|endoftext|> its unk token
    assert vocab.special_text[0] == "<|endoftext|>"
    assert vocab.id_for_role("<|im_start|>") == 1


def test_byte_tokenizer_maps_ids_to_bytes_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tok = build_byte_tokenizer(
        ["<|endoftext|>", "<|im_start|>"], bos="<|endoftext|>", eos="<|endoftext|>"
    )
    vocab = vocab_from_tokenizer(tok)
    assert vocab.kind == "bytes" and vocab.size == 258
    assert vocab.token_bytes[:256] == tuple(bytes([b]) for b in range(256))
    raw = "a é\n<|im_start|>".encode()
    ids = tok(raw.decode(), add_special_tokens=False)["input_ids"]
    assert ids == [*raw[: len(raw) - len(b"<|im_start|>")], 257]  # specials atomic when not split
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert vocab_from_tokenizer(again).fingerprint() == vocab.fingerprint()
    assert again(raw.decode(), add_special_tokens=False)["input_ids"] == ids


def test_fingerprint_is_stable_and_sensitive():
    tok, vocab = tok_and_vocab("bpe")
    assert vocab_from_tokenizer(copy.deepcopy(tok)).fingerprint() == vocab.fingerprint()
    assert vocab_from_tokenizer(tok, name="other-name").fingerprint() == vocab.fingerprint()
    assert vocab_from_tokenizer(bpe_tokenizer(vocab_size=600)).fingerprint() != vocab.fingerprint()
    # The byte tokenizer involves no training: its fingerprint is pinned.
    byte_fp = vocab_from_tokenizer(
        build_byte_tokenizer(["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    ).fingerprint()
    assert byte_fp == PINNED_BYTE_FINGERPRINT
    assert byte_fp == reference_fingerprint([bytes([b]) for b in range(256)] + [b""], {256: "bos"})


PINNED_BYTE_FINGERPRINT = "09539fcac1839c98d2ecb8b4cec81c9b1a65031a3c09a3d13a81bf90558c4f00"


def reference_fingerprint(token_bytes: list[bytes], roles: dict[int, str]) -> str:
    """The documented canonical form: header, then per id: u32 LE length, bytes, special flag, role, NUL."""
    import hashlib

    h = hashlib.sha256(f"alm-vocab/1\0{len(token_bytes)}\0".encode())
    for i, b in enumerate(token_bytes):
        h.update(len(b).to_bytes(4, "little") + b + (b"\1" if i in roles else b"\0"))
        h.update(roles.get(i, "").encode() + b"\0")
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["bpe", "sp_bpe", "smollm2"])
def test_arrow_round_trip_is_identity(kind, tmp_path):
    _, vocab = tok_and_vocab(kind)
    table = vocab.to_arrow()
    assert table.column_names[:5] == ["id", "token_bytes", "is_special", "role", "boundary_class"]
    assert table.schema.field("token_bytes").type == pa.binary()
    pq.write_table(table, tmp_path / "vocab.parquet")
    back = Vocab.from_arrow(pq.read_table(tmp_path / "vocab.parquet"))
    assert back.token_bytes == vocab.token_bytes
    np.testing.assert_array_equal(back.is_special, vocab.is_special)
    np.testing.assert_array_equal(back.boundary_class, vocab.boundary_class)
    np.testing.assert_array_equal(back.is_byte_fallback, vocab.is_byte_fallback)
    assert back.special_role == vocab.special_role
    assert back.special_text == vocab.special_text
    assert back.kind == vocab.kind and back.name == vocab.name
    assert back.fingerprint() == vocab.fingerprint()


def test_arrow_table_with_tampered_rows_is_rejected():
    _, vocab = tok_and_vocab("bytes")
    table = vocab.to_arrow()
    col = table.column("token_bytes").to_pylist()
    col[65] = b"B"
    tampered = table.set_column(1, "token_bytes", pa.array(col, type=pa.binary()))
    with pytest.raises(DataError, match="fingerprint"):
        Vocab.from_arrow(tampered)


def test_byte_level_prefix_space_is_a_dummy_prefix():
    """RoBERTa-style ByteLevel(add_prefix_space=True) prepends a space that is not in the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_texts(100), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    vocab = vocab_from_tokenizer(hf)
    enc = encode_text(hf, vocab, b"hello world")
    assert enc.dummy_prefix and vocab.token_bytes[enc.token_id[0]].startswith(b" ")
    assert_exact(vocab, b"hello world", enc)


@pytest.mark.parametrize("layout", ["gemma", "llama2_legacy"])
def test_sentencepiece_normalizer_layouts_of_real_models(layout):
    """Gemma's HF tokenizer escapes spaces in a Replace normalizer (no dummy prefix); Llama-2's legacy one adds a
    Prepend("▁") normalizer (a dummy prefix on every text, even one that starts with a space)."""
    from tokenizers import normalizers

    tok = copy.deepcopy(sentencepiece_tokenizer())
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = None
    if layout == "gemma":
        backend.normalizer = normalizers.Replace(" ", "▁")
    else:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
    vocab = vocab_from_tokenizer(tok)
    assert vocab.kind == "sentencepiece"
    for text in (
        b"hello world",
        b" leading space",
        b"\nnewline first",
        *(t.encode() for t in TRICKY_TEXTS),
    ):
        enc = encode_text(tok, vocab, text)
        assert enc.dummy_prefix == (layout == "llama2_legacy")
        assert_exact(vocab, text, enc)


def test_llama3_style_split_then_bytelevel_pretokenizer():
    """Llama-3/Qwen2 tokenizers split with their own regex, then ByteLevel(use_regex=False)."""
    from tokenizers import Regex, pre_tokenizers

    tok = copy.deepcopy(bpe_tokenizer())
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab = vocab_from_tokenizer(tok)
    assert vocab.kind == "byte_level_bpe"
    for text in TRICKY_TEXTS:
        assert_exact(vocab, text.encode(), encode_text(tok, vocab, text.encode()))


_BYTE_TOK = byte_tokenizer()
_BYTE_VOCAB = vocab_from_tokenizer(_BYTE_TOK)
_BPE_TOK = bpe_tokenizer()
_BPE_VOCAB = vocab_from_tokenizer(_BPE_TOK)


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
    | st.sampled_from(["<|im_start|>x", "a<|endoftext|>"])
)
def test_byte_lookup_encoding_equals_the_byte_tokenizers_own(text):
    from alm.vocab import _byte_table, _encode_ids

    assert _byte_table(_BYTE_TOK, _BYTE_VOCAB) is not None  # the fast path is taken
    assert _byte_table(_BPE_TOK, _BPE_VOCAB) is None  # never for a tokenizer with merges
    enc = encode_text(_BYTE_TOK, _BYTE_VOCAB, text.encode())
    assert enc.token_id.tolist() == _encode_ids(_BYTE_TOK, [text])[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 511), max_size=200))
def test_ids_bytes_is_the_join_of_the_token_bytes(ids):
    array = np.asarray(ids, dtype=np.int64)
    assert _BPE_VOCAB.ids_bytes(array) == b"".join(_BPE_VOCAB.token_bytes[i] for i in ids)
