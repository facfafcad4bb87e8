"""Tokenizers as bytes (ALM_SPEC.md §2): placeholder, the full module lands shortly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE vocabularies (§2)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(0xA1, 0xAC + 1))
        + list(range(0xAE, 0xFF + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_byte_tokenizer(
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
) -> Any:
    """The pure byte tokenizer of §2: ids 0-255 are the bytes 0x00-0xFF, specials follow from id 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = gpt2_bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    kwargs = {
        k: v
        for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad))
        if v is not None
    }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
