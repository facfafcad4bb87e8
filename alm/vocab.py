"""Tokenizers as bytes ("byteify", ALM_SPEC.md §2 and §13.4-13.5).

Owns: the `Vocab` table (for every id, the exact bytes it contributes to the text, whether it is special, the
role of special tokens, the first-byte boundary class), its fingerprint and Arrow form; refusing tokenizers that
cannot reproduce the bytes of a text (lower-casing / Unicode normalizers, WordPiece `##`, `<unk>` on input);
exact-bytes encoding of one text segment (`encode_text`) and offsets of already-tokenized ids (`token_offsets`);
and the pure byte tokenizer (`build_byte_tokenizer`).

Three tokenizer kinds are understood:

- `byte_level_bpe` (GPT-2, Llama-3, Qwen2, SmolLM2): token strings are in the GPT-2 byte alphabet;
- `sentencepiece` (Llama-2, Gemma, Mistral style): `▁` is a space, `<0xNN>` is byte NN (byte fallback); the
  dummy prefix space that such tokenizers prepend is detected per encoding and excluded from the offsets;
- `bytes`: the pure byte tokenizer (256 byte tokens + specials).

Boundary classes (team convention): 0 space (first byte 0x20), 1 newline (0x0A), 2 tab (0x09), 3 other whitespace
(0x0B, 0x0C, 0x0D), 4 special; -1 none. A special token is only in class 4.

Imports `numpy`, `pyarrow` (lazily), `tokenizers`/`transformers` (lazily) and `alm.errors`; never `torch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

# The boundary classes are defined once, in alm.boundary; re-exported here for the vocabulary's users.
from alm.boundary import BOUNDARY_CLASS_NAMES as BOUNDARY_CLASS_NAMES
from alm.boundary import NUM_BOUNDARY_CLASSES as NUM_BOUNDARY_CLASSES
from alm.boundary import SPECIAL_CLASS as SPECIAL_CLASS
from alm.boundary import boundary_class_of as boundary_class_of
from alm.errors import DataError, TokenizerRefusedError

logger = logging.getLogger(__name__)


VOCAB_ARROW_FORMAT = "alm-vocab/1"

# Chat-template markers keep their own string as role even when the tokenizer also names them bos/eos/pad.
CHAT_MARKERS = frozenset(
    {
        "<|im_start|>",
        "<|im_end|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<start_of_turn>",
        "<end_of_turn>",
    }
)

_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Unicode normalizers change bytes (§2); lower-casing and accent stripping lose information outright.
_REFUSED_NORMALIZERS = {
    "NFC": "Unicode NFC normalization",
    "NFD": "Unicode NFD normalization",
    "NFKC": "Unicode NFKC normalization",
    "NFKD": "Unicode NFKD normalization",
    "Lowercase": "lower-casing",
    "StripAccents": "accent stripping",
    "Strip": "whitespace stripping",
    "Precompiled": "a SentencePiece precompiled normalization map (NFKC-like)",
    "BertNormalizer": "BERT normalization (cleaning, lower-casing, accent stripping)",
    "Nmt": "NMT normalization (control characters removed)",
}
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})

# Probed at construction: a tokenizer that cannot reproduce these bytes is refused up front.
_PROBE_TEXTS = (
    "Hello World!\n\tIndented  two  spaces\r\nx",
    "ÀÉ ü ß 日本語 中文 😀 e\u0301 ½ ﬁ",
    " leading space",
)


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


_UNICODE_TO_BYTE = {c: b for b, c in gpt2_bytes_to_unicode().items()}


@dataclass(frozen=True, eq=False)
class Vocab:
    """A tokenizer's vocabulary as bytes (ALM_SPEC §2).

    Attributes:
        name: tokenizer name or path (not part of the fingerprint).
        token_bytes: [V] the bytes each id contributes to the text; `b""` for special tokens.
        is_special: bool [V]; special tokens are opaque symbols, not text.
        special_role: id -> role for special tokens: `bos`, `eos`, `pad`, `unk`, or the token's own string
            (chat markers such as `<|im_start|>` always keep their own string).
        boundary_class: int8 [V]: -1 none, 0 space, 1 newline, 2 tab, 3 other whitespace, 4 special.
        kind: `byte_level_bpe`, `sentencepiece` or `bytes`.
        is_byte_fallback: bool [V]: SentencePiece `<0xNN>` tokens (they lose to literal tokens with the same
            bytes in the bytes -> id direction).
        special_text: id -> the special token's string (e.g. `<|im_start|>`), for display and templates.
    """

    name: str
    token_bytes: tuple[bytes, ...]
    is_special: np.ndarray
    special_role: dict[int, str]
    boundary_class: np.ndarray
    kind: str
    is_byte_fallback: np.ndarray = field(default=None)  # type: ignore[assignment]
    special_text: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = len(self.token_bytes)
        if self.is_byte_fallback is None:
            object.__setattr__(self, "is_byte_fallback", np.zeros(size, dtype=bool))
        assert self.is_special.shape == (size,) and self.boundary_class.shape == (size,)

    def __len__(self) -> int:
        return len(self.token_bytes)

    @property
    def size(self) -> int:
        """Number of ids V."""
        return len(self.token_bytes)

    @cached_property
    def token_length(self) -> np.ndarray:
        """int64 [V]: number of bytes each id contributes (0 for specials)."""
        return np.fromiter((len(b) for b in self.token_bytes), dtype=np.int64, count=self.size)

    @cached_property
    def token_bytes_flat(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token's bytes concatenated (uint8 [sum of lengths]) and where each token starts in it (int64 [V]):
        the bytes of many ids are one gather (`ids_bytes`), not a Python loop over tokens."""
        flat = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        starts = np.cumsum(self.token_length) - self.token_length
        return flat, starts

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """The special ids, as a set (membership tests on a few ids without NumPy)."""
        return frozenset(np.flatnonzero(self.is_special).tolist())

    def ids_bytes(self, ids: np.ndarray) -> bytes:
        """The concatenated bytes of `ids` (int [n]), i.e. `b"".join(token_bytes[i] for i in ids)`."""
        if len(ids) < 64:  # a few tokens: the join is cheaper than the gather's numpy calls
            return b"".join([self.token_bytes[i] for i in ids.tolist()])
        flat, starts = self.token_bytes_flat
        lengths = self.token_length[ids]  # [n]
        total = int(lengths.sum())
        if total == 0:
            return b""
        ends = np.cumsum(lengths)  # [n]
        # position p of the output lies in token k = its run; its source is starts[ids[k]] + (p - run start)
        shift = np.repeat(starts[ids] - (ends - lengths), lengths)  # [total]
        return flat[np.arange(total, dtype=np.int64) + shift].tobytes()

    @cached_property
    def bytes_to_id(self) -> dict[bytes, int]:
        """Non-special bytes -> id; on duplicates a literal token beats a byte-fallback one, then the lower id."""
        out: dict[bytes, int] = {}
        for token_id, token_bytes in enumerate(self.token_bytes):
            if self.is_special[token_id] or not token_bytes:
                continue
            prev = out.get(token_bytes)
            if prev is None or (
                self.is_byte_fallback[prev] and not self.is_byte_fallback[token_id]
            ):
                out[token_bytes] = token_id
        return out

    def id_for_role(self, role: str) -> int | None:
        """The lowest special id with `role` (`bos`, `eos`, ... or a marker string), or None."""
        ids = [i for i, r in self.special_role.items() if r == role]
        if not ids:
            ids = [i for i, t in self.special_text.items() if t == role]
        return min(ids) if ids else None

    def boundary_mask(self, classes: Iterable[int]) -> np.ndarray:
        """bool [V]: ids whose boundary class is one of `classes`."""
        return np.isin(self.boundary_class, np.asarray(list(classes), dtype=np.int8))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical table (not the name or kind).

        Canonical form: `"alm-vocab/1\\0{V}\\0"`, then for every id in order: its byte length (u32 little
        endian), its bytes, `\\1` if special else `\\0`, its role in UTF-8 (empty if none), `\\0`.
        """
        h = hashlib.sha256()
        h.update(f"{VOCAB_ARROW_FORMAT}\0{self.size}\0".encode())
        for token_id, token_bytes in enumerate(self.token_bytes):
            special = bool(self.is_special[token_id])
            role = self.special_role.get(token_id, "")
            h.update(len(token_bytes).to_bytes(4, "little"))
            h.update(token_bytes)
            h.update(b"\1" if special else b"\0")
            h.update(role.encode("utf-8") + b"\0")
        return h.hexdigest()

    def to_arrow(self) -> Any:
        """A `pyarrow.Table` with columns `id` int32, `token_bytes` binary, `is_special` bool, `role` string
        (null for non-special), `boundary_class` int8, `is_byte_fallback` bool, `special_text` string; schema
        metadata holds `format`, `name`, `kind` and `fingerprint`."""
        import pyarrow as pa

        roles = [self.special_role.get(i) for i in range(self.size)]
        texts = [self.special_text.get(i) for i in range(self.size)]
        table = pa.table(
            {
                "id": pa.array(np.arange(self.size, dtype=np.int32)),
                "token_bytes": pa.array(list(self.token_bytes), type=pa.binary()),
                "is_special": pa.array(self.is_special.astype(bool)),
                "role": pa.array(roles, type=pa.string()),
                "boundary_class": pa.array(self.boundary_class.astype(np.int8)),
                "is_byte_fallback": pa.array(self.is_byte_fallback.astype(bool)),
                "special_text": pa.array(texts, type=pa.string()),
            }
        )
        meta = {
            "format": VOCAB_ARROW_FORMAT,
            "name": self.name,
            "kind": self.kind,
            "fingerprint": self.fingerprint(),
        }
        return table.replace_schema_metadata({k: v.encode() for k, v in meta.items()})

    @classmethod
    def from_arrow(cls, table: Any) -> Vocab:
        """Inverse of `to_arrow` (rows must be ids 0..V-1 in order).

        Raises:
            DataError: the table is not an `alm-vocab/1` table or its fingerprint does not match its rows.
        """
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != VOCAB_ARROW_FORMAT:
            raise DataError(
                f"vocabulary table has format {meta.get('format')!r}, expected {VOCAB_ARROW_FORMAT!r}; "
                "it was not written by alm.Vocab.to_arrow"
            )
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise DataError("vocabulary table rows are not ids 0..V-1 in order")
        roles = table.column("role").to_pylist()
        texts = (
            table.column("special_text").to_pylist()
            if "special_text" in table.column_names
            else [None] * len(ids)
        )
        fallback = (
            table.column("is_byte_fallback").to_numpy(zero_copy_only=False).astype(bool)
            if "is_byte_fallback" in table.column_names
            else None
        )
        vocab = cls(
            name=meta.get("name", ""),
            token_bytes=tuple(table.column("token_bytes").to_pylist()),
            is_special=table.column("is_special").to_numpy(zero_copy_only=False).astype(bool),
            special_role={i: r for i, r in enumerate(roles) if r is not None},
            boundary_class=table.column("boundary_class").to_numpy().astype(np.int8),
            kind=meta.get("kind", ""),
            is_byte_fallback=fallback,  # type: ignore[arg-type]
            special_text={i: t for i, t in enumerate(texts) if t is not None},
        )
        expected = meta.get("fingerprint")
        if expected and vocab.fingerprint() != expected:
            raise DataError(
                f"vocabulary table fingerprint {vocab.fingerprint()} does not match the recorded "
                f"{expected}: the table is corrupt"
            )
        return vocab


# --------------------------------------------------------------------------------------------------------------
# Building a Vocab from a Hugging Face tokenizer


def tokenizer_name(tokenizer: Any) -> str:
    """A human-readable name for messages: `name_or_path`, else the class name."""
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _refuse(tokenizer: Any, reason: str, fix: str) -> TokenizerRefusedError:
    return TokenizerRefusedError(
        f"tokenizer {tokenizer_name(tokenizer)!r} is refused: {reason}. {fix}"
    )


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _refuse(
            tokenizer,
            "it is not backed by the Hugging Face `tokenizers` library (a slow/Python tokenizer)",
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to tokenizer.json.",
        )
    return json.loads(backend.to_str())


def _walk_types(node: Any) -> list[dict[str, Any]]:
    """All `{"type": ...}` components in a (possibly nested Sequence) normalizer/pre-tokenizer/decoder."""
    if node is None:
        return []
    if isinstance(node, list):
        return [c for item in node for c in _walk_types(item)]
    if not isinstance(node, dict):
        return []
    out = [node] if "type" in node else []
    for key in ("normalizers", "pretokenizers", "decoders"):
        out.extend(_walk_types(node.get(key)))
    return out


def _check_normalizer(tokenizer: Any, normalizer: Any) -> bool:
    """Refuse normalizers that change bytes; return True if the normalizer is SentencePiece's `▁` escaping."""
    sp_escape = False
    for comp in _walk_types(normalizer):
        kind = comp["type"]
        if kind == "Sequence":
            continue
        if kind in _REFUSED_NORMALIZERS:
            fix = "A tokenizer that rewrites text cannot reproduce its exact bytes (ALM_SPEC §2)."
            if kind in _UNICODE_NORMALIZERS:
                fix = (
                    "Normalize your data once up front and drop the normalizer, as tokenkit does "
                    "(ALM_SPEC §2): set `student.strip_unicode_normalizer: true` in a train recipe, or pass "
                    "alm.vocab.without_unicode_normalizer(tokenizer) in your own code. Every encode still "
                    "checks the bytes, so a text that would need normalizing is refused, never misaligned."
                )
            if kind == "BertNormalizer" and not (
                comp.get("lowercase") or comp.get("strip_accents") or comp.get("clean_text")
            ):
                continue
            raise _refuse(tokenizer, f"its normalizer applies {_REFUSED_NORMALIZERS[kind]}", fix)
        if kind == "Replace":
            pattern = comp.get("pattern", {}).get("String")
            if pattern == " " and comp.get("content") == "▁":
                sp_escape = True
                continue
            raise _refuse(
                tokenizer,
                f"its normalizer replaces {comp.get('pattern')} with {comp.get('content')!r}",
                "Only SentencePiece's ' ' -> '▁' escaping keeps bytes recoverable.",
            )
        if kind == "Prepend":
            if comp.get("prepend") == "▁":
                sp_escape = True
                continue
            raise _refuse(tokenizer, f"its normalizer prepends {comp.get('prepend')!r}", "")
        raise _refuse(
            tokenizer,
            f"its normalizer {kind!r} is not known to keep bytes intact",
            "Remove the normalizer or use a tokenizer without one.",
        )
    return sp_escape


def _added_tokens(tokenizer: Any) -> dict[int, Any]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    return dict(decoder) if decoder else {}


def _special_ids(tokenizer: Any, added: dict[int, Any]) -> set[int]:
    ids = {i for i, tok in added.items() if getattr(tok, "special", False)}
    ids.update(i for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    return ids


def _roles(tokenizer: Any, special_ids: set[int], texts: dict[int, str]) -> dict[int, str]:
    named: dict[int, str] = {}
    for role in ("bos", "eos", "unk", "pad"):  # priority when one token has several roles
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None and token_id not in named:
            named[token_id] = role
    roles = {}
    for token_id in special_ids:
        text = texts.get(token_id, "")
        roles[token_id] = text if text in CHAT_MARKERS else named.get(token_id, text)
    return roles


def vocab_from_tokenizer(tokenizer: Any, name: str | None = None) -> Vocab:
    """Build the `Vocab` of a Hugging Face fast tokenizer, refusing ones that cannot reproduce bytes.

    Args:
        tokenizer: a `transformers` tokenizer backed by `tokenizers` (byte-level BPE, SentencePiece-style BPE or
            Unigram with `▁`, or the pure byte tokenizer of `build_byte_tokenizer`).
        name: name recorded in the Vocab (default: the tokenizer's `name_or_path`).

    Raises:
        TokenizerRefusedError: a normalizer that changes bytes (lower-casing, NF*), a WordPiece / WordLevel
            model, a token outside the byte alphabet, a tokenizer that produces `<unk>` or cannot reproduce the
            probe texts' bytes. The message names the tokenizer and the reason.
    """
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    model_type = model.get("type")
    if model_type == "WordPiece" or model.get("continuing_subword_prefix") == "##":
        raise _refuse(
            tokenizer,
            "it is a WordPiece tokenizer: `##` continuation pieces and dropped whitespace do not concatenate "
            "back to the text",
            "Use a byte-level BPE or SentencePiece tokenizer (ALM_SPEC §2).",
        )
    if model_type not in ("BPE", "Unigram"):
        raise _refuse(
            tokenizer,
            f"its model type {model_type!r} maps unknown words to <unk>",
            "Use a byte-level BPE or SentencePiece tokenizer with byte fallback.",
        )
    sp_escape = _check_normalizer(tokenizer, spec.get("normalizer"))
    pre_types = {c["type"] for c in _walk_types(spec.get("pre_tokenizer"))}
    dec_types = {c["type"] for c in _walk_types(spec.get("decoder"))}
    if "ByteLevel" in pre_types:
        kind = "byte_level_bpe"
    elif sp_escape or "Metaspace" in pre_types or "ByteFallback" in dec_types:
        kind = "sentencepiece"
    else:
        raise _refuse(
            tokenizer,
            f"its pre-tokenizer ({sorted(pre_types) or 'none'}) is neither ByteLevel nor SentencePiece "
            "Metaspace, so whitespace is not recoverable from its tokens",
            "Use a byte-level BPE or SentencePiece tokenizer.",
        )

    size = len(tokenizer)
    added = _added_tokens(tokenizer)
    special_ids = _special_ids(tokenizer, added)
    texts: dict[int, str] = {}
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    token_bytes: list[bytes] = []
    is_special = np.zeros(size, dtype=bool)
    is_byte_fallback = np.zeros(size, dtype=bool)
    byte_fallback_model = bool(model.get("byte_fallback"))
    for token_id, piece in enumerate(pieces):
        if piece is None:
            raise _refuse(
                tokenizer, f"id {token_id} has no token string", "The vocabulary has holes."
            )
        if token_id in special_ids:
            is_special[token_id] = True
            texts[token_id] = added[token_id].content if token_id in added else piece
            token_bytes.append(b"")
            continue
        if (
            token_id in added
        ):  # added non-special tokens match their literal content in the raw text
            token_bytes.append(added[token_id].content.encode("utf-8"))
            continue
        if kind == "byte_level_bpe":
            try:
                token_bytes.append(bytes(_UNICODE_TO_BYTE[ch] for ch in piece))
            except KeyError:
                raise _refuse(
                    tokenizer,
                    f"token {token_id} ({piece!r}) is not written in the GPT-2 byte alphabet",
                    "A byte-level BPE must store every token as GPT-2 byte characters.",
                ) from None
        else:
            match = _BYTE_FALLBACK_RE.match(piece)
            if match and byte_fallback_model:
                token_bytes.append(bytes([int(match.group(1), 16)]))
                is_byte_fallback[token_id] = True
            else:
                token_bytes.append(piece.replace("▁", " ").encode("utf-8"))
    non_special = [b for b, s in zip(token_bytes, is_special, strict=True) if not s]
    if len(set(non_special)) == 256 == len(non_special) and all(len(b) == 1 for b in non_special):
        kind = "bytes"
    boundary = np.array(
        [boundary_class_of(b, s) for b, s in zip(token_bytes, is_special, strict=True)],
        dtype=np.int8,
    )
    vocab = Vocab(
        name=name or tokenizer_name(tokenizer),
        token_bytes=tuple(token_bytes),
        is_special=is_special,
        special_role=_roles(tokenizer, special_ids, texts),
        boundary_class=boundary,
        kind=kind,
        is_byte_fallback=is_byte_fallback,
        special_text=texts,
    )
    for probe in _PROBE_TEXTS:
        encode_text(tokenizer, vocab, probe.encode("utf-8"))
    return vocab


def without_unicode_normalizer(tokenizer: Any) -> Any:
    """A deep copy of `tokenizer` with NFC/NFD/NFKC/NFKD normalizers removed (tokenkit's fix, ALM_SPEC §2).

    Use it only after normalizing your data the same way, so that the model sees the text it was trained on.
    """
    import copy

    out = copy.deepcopy(tokenizer)
    spec = json.loads(out.backend_tokenizer.to_str())
    norm = spec.get("normalizer")
    if norm is None:
        return out
    if norm.get("type") in _UNICODE_NORMALIZERS:
        out.backend_tokenizer.normalizer = None
    elif norm.get("type") == "Sequence":
        kept = [n for n in norm["normalizers"] if n.get("type") not in _UNICODE_NORMALIZERS]
        out.backend_tokenizer.normalizer = _normalizer_from_json(kept) if kept else None
    return out


def _normalizer_from_json(parts: list[dict[str, Any]]) -> Any:
    from tokenizers import Tokenizer, models

    tmp = Tokenizer(models.BPE())
    spec = json.loads(tmp.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": parts}
    return Tokenizer.from_str(json.dumps(spec)).normalizer


# --------------------------------------------------------------------------------------------------------------
# Exact-bytes encoding


@dataclass(frozen=True)
class TokenizedText:
    """One text segment tokenized with exact byte offsets.

    Attributes:
        token_id: int32 [n].
        start_byte: int64 [n] offsets into the segment's bytes (dummy prefix excluded).
        end_byte: int64 [n], exclusive.
        num_bytes: bytes of the segment covered (the input minus a trailing partial UTF-8 character).
        dummy_prefix: whether the tokenizer prepended a dummy space (SentencePiece `▁`).
    """

    token_id: np.ndarray
    start_byte: np.ndarray
    end_byte: np.ndarray
    num_bytes: int
    dummy_prefix: bool = False

    def __len__(self) -> int:
        return len(self.token_id)


def complete_utf8_prefix(text: bytes) -> int:
    """Length of `text` without a trailing *partial* UTF-8 character (0-3 bytes dropped).

    Raises:
        DataError: `text` is not valid UTF-8 before its last (partial) character.
    """
    end = len(text)
    # walk back over at most 3 continuation bytes to the lead byte of the last character
    lead = end - 1
    while lead >= 0 and end - lead <= 4 and (text[lead] & 0xC0) == 0x80:
        lead -= 1
    if lead >= 0:
        b = text[lead]
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
        if end - lead < need:
            end = lead
    try:
        text[:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"text is not valid UTF-8 at byte offset {exc.start} ({text[exc.start : exc.start + 4]!r}); "
            "alm works on UTF-8 text: fix or drop the document"
        ) from None
    return end


def _offsets_from_lengths(lengths: np.ndarray, dummy_prefix: bool) -> tuple[np.ndarray, np.ndarray]:
    end_byte = np.cumsum(lengths, dtype=np.int64)
    start_byte = end_byte - lengths
    if dummy_prefix:
        end_byte = np.maximum(end_byte - 1, 0)
        start_byte = np.maximum(start_byte - 1, 0)
    return start_byte, end_byte


def _check_tokens(vocab: Vocab, ids: np.ndarray, text: bytes, what: str) -> bool:
    """Verify that the tokens' bytes equal `text` (or a dummy space + `text`); return whether a dummy was used."""
    if (
        len(ids) < 64
    ):  # a few tokens (a chat turn): Python's set and join beat numpy's per-call cost
        ids_list = ids.tolist()
        has_special = not vocab.special_ids.isdisjoint(ids_list)
        joined = None if has_special else b"".join([vocab.token_bytes[i] for i in ids_list])
    else:
        has_special = bool(vocab.is_special[ids].any())
        joined = None if has_special else vocab.ids_bytes(ids)
    if joined is None:
        pos = int(np.flatnonzero(vocab.is_special[ids])[0])
        token_id = int(ids[pos])
        role = vocab.special_role.get(token_id, "")
        reason = "produced <unk>" if role == "unk" else "produced a special token"
        raise TokenizerRefusedError(
            f"tokenizer {vocab.name!r} {reason} ({vocab.special_text.get(token_id, token_id)!r}, id "
            f"{token_id}) at token {pos} for {what} {_excerpt(text)}: its tokens cannot reproduce the text's "
            "bytes. Use a tokenizer with byte fallback (ALM_SPEC §13.4)."
        )
    if joined == text:
        return False
    # A dummy prefix space: SentencePiece's `▁`, or a byte-level BPE with `add_prefix_space=True` (RoBERTa).
    if vocab.kind != "bytes" and joined == b" " + text:
        return True
    common = next(
        (k for k, (x, y) in enumerate(zip(joined, text, strict=False)) if x != y),
        min(len(joined), len(text)),
    )
    raise TokenizerRefusedError(
        f"tokenizer {vocab.name!r} does not reproduce the bytes of {what} {_excerpt(text)}: they differ "
        f"at byte {common} (tokens give {joined[max(0, common - 8) : common + 8]!r}, text has "
        f"{text[max(0, common - 8) : common + 8]!r}). The tokenizer drops or rewrites characters (no token for a byte, a normalizer, <unk>); "
        "it cannot be used for ALM (ALM_SPEC §2)."
    )


def _excerpt(text: bytes) -> str:
    return repr(text[:40] + (b"..." if len(text) > 40 else b""))


def _encode_ids(tokenizer: Any, strings: Sequence[str]) -> list[list[int]]:
    """Ids of each of `strings` without added special tokens, literal special-token strings kept as text.

    Calls the `tokenizers` backend directly (about 2x faster than `tokenizer(...)`), with `encode_special_tokens`
    set for the call, which is what `tokenizer(..., split_special_tokens=True)` does; several strings are one
    backend call (the same ids as one call each: each string is encoded on its own).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [
            tokenizer(string, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            for string in strings
        ]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        # `encode_batch_fast` (tokenizers >= 0.21) gives the same ids without tracking character offsets, which
        # alm never reads (offsets come from the token bytes): 1.5x faster on long text.
        encode_fast = getattr(backend, "encode_batch_fast", None)
        if encode_fast is not None:
            return [enc.ids for enc in encode_fast(list(strings), add_special_tokens=False)]
        return [backend.encode(string, add_special_tokens=False).ids for string in strings]
    finally:
        backend.encode_special_tokens = previous


# Per tokenizer object: the vocabulary it was decided for and its byte -> id table when it is an identity byte
# tokenizer, else None (`_byte_table`).
_BYTE_TABLES: weakref.WeakKeyDictionary[Any, tuple[Vocab, np.ndarray | None]] = (
    weakref.WeakKeyDictionary()
)


def _byte_table(tokenizer: Any, vocab: Vocab) -> np.ndarray | None:
    """The id of each byte (int32 [256]) when `tokenizer` can only map every byte to its own token, else None.

    That holds for the pure byte tokenizer (`build_byte_tokenizer`): a `bytes` vocabulary (256 one-byte tokens),
    no normalizer, a ByteLevel pre-tokenizer without prefix space and a BPE model without merges. Its encoding
    of any text is then the byte lookup, which `encode_text` uses instead of calling the tokenizer. Every entry
    is a non-special id of `vocab` whose bytes are that one byte (`Vocab.bytes_to_id`), so the lookup reproduces
    the text by construction and needs no per-text `_check_tokens`.
    """
    try:
        cached_vocab, cached_table = _BYTE_TABLES[tokenizer]
        if cached_vocab is vocab:
            return cached_table
    except (KeyError, TypeError):
        pass
    table = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if vocab.kind == "bytes" and backend is not None:
        spec = json.loads(backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        model = spec.get("model") or {}
        if (
            spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel"
            and not pre.get("add_prefix_space")
            and model.get("type") == "BPE"
            and not model.get("merges")
        ):
            table = np.full(256, -1, dtype=np.int32)
            for token_bytes, token_id in vocab.bytes_to_id.items():
                if len(token_bytes) == 1:
                    table[token_bytes[0]] = token_id
            if (table < 0).any():
                table = None
    with contextlib.suppress(TypeError):  # not weak-referenceable: decided again next time
        _BYTE_TABLES[tokenizer] = (vocab, table)
    return table


def encode_text(tokenizer: Any, vocab: Vocab, text: bytes) -> TokenizedText:
    """Exact-bytes encoding of one regular-text segment (no special tokens added, literal markers stay text).

    A trailing partial UTF-8 character is not given to the tokenizer; a SentencePiece dummy prefix space is
    excluded from the offsets (the first token covers one byte fewer; a lone `▁` has zero width).

    Args:
        tokenizer: the HF tokenizer `vocab` was built from.
        vocab: its `Vocab`.
        text: UTF-8 bytes of the segment.

    Returns:
        `TokenizedText` with offsets into `text`.

    Raises:
        TokenizerRefusedError: the tokens' bytes do not reproduce the text (or `<unk>` was produced).
        DataError: `text` is not valid UTF-8.
    """
    return encode_texts(tokenizer, vocab, [text])[0]


def encode_texts(tokenizer: Any, vocab: Vocab, texts: Sequence[bytes]) -> list[TokenizedText]:
    """`encode_text` of each of `texts`, the tokenizer called once for all of them (the same encodings).

    Stage two encodes a micro-batch's text segments this way: one call keeps the tokenizer's tables warm in the
    CPU caches between texts (about 20% of its time on 2 KB documents), and its per-call cost is paid once.

    Raises:
        TokenizerRefusedError, DataError: as `encode_text`, for the first text that fails.
    """
    bodies: list[bytes] = []
    strings: list[str] = []
    for text in texts:
        try:
            body = bytes(text)
            string = body.decode("utf-8")
        except UnicodeDecodeError:
            body = text[: complete_utf8_prefix(text)]
            string = body.decode("utf-8")
        bodies.append(body)
        strings.append(string)
    byte_table = _byte_table(tokenizer, vocab)
    if byte_table is not None:
        # One token per byte, each a non-special token whose bytes are that byte (`_byte_table` checked the
        # table once per tokenizer), so the tokens reproduce each body by construction: `_check_tokens` is moot.
        out = []
        for body in bodies:
            token_id = byte_table[np.frombuffer(body, dtype=np.uint8)]  # [n]
            start_byte = np.arange(len(body), dtype=np.int64)
            out.append(TokenizedText(token_id, start_byte, start_byte + 1, len(body), False))
        return out
    todo = [k for k, body in enumerate(bodies) if body]
    ids = dict(zip(todo, _encode_ids(tokenizer, [strings[k] for k in todo]), strict=True))
    out = []
    for k, body in enumerate(bodies):
        if not body:
            empty = np.zeros(0, dtype=np.int64)
            out.append(TokenizedText(np.zeros(0, dtype=np.int32), empty, empty.copy(), 0))
            continue
        token_id = np.asarray(ids[k], dtype=np.int32)
        dummy = _check_tokens(vocab, token_id, body, "text")
        start_byte, end_byte = _offsets_from_lengths(vocab.token_length[token_id], dummy)
        out.append(TokenizedText(token_id, start_byte, end_byte, len(body), dummy))
    return out


def token_offsets(
    vocab: Vocab, token_ids: Sequence[int] | np.ndarray, text: bytes
) -> TokenizedText:
    """Offsets of ids that were already tokenized from `text` (e.g. stored teacher ids, stage two).

    Args:
        vocab: the Vocab of the tokenizer that produced the ids.
        token_ids: int [n] ids of one regular-text segment.
        text: the segment's bytes (already cut exactly where its tokens stop).

    Raises:
        TokenizerRefusedError: the ids' bytes are not `text` (nor a dummy space + `text`).
    """
    token_id = np.asarray(token_ids, dtype=np.int32)
    dummy = _check_tokens(vocab, token_id, text, "stored text")
    start_byte, end_byte = _offsets_from_lengths(vocab.token_length[token_id], dummy)
    return TokenizedText(token_id, start_byte, end_byte, len(text), dummy)


# --------------------------------------------------------------------------------------------------------------
# The pure byte tokenizer


def build_byte_tokenizer(
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
) -> Any:
    """The pure byte tokenizer of ALM_SPEC §2: ids 0-255 are the bytes 0x00-0xFF, specials follow from id 256.

    No normalizer; ByteLevel pre-tokenizer without regex and without prefix space; no merges, so every byte is
    one token; special tokens are atomic. Saveable with `save_pretrained`, reloadable with `AutoTokenizer`.

    Args:
        special_tokens: special token strings, ids 256, 257, ... in order.
        bos, eos, pad: which of `special_tokens` play these roles (each must be in `special_tokens`).

    Raises:
        ConfigError: a named role is not one of `special_tokens`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alm.errors import ConfigError

    for role, value in (("bos", bos), ("eos", eos), ("pad", pad)):
        if value is not None and value not in special_tokens:
            raise ConfigError(
                f"byte tokenizer: {role}={value!r} is not one of the special tokens {list(special_tokens)}; "
                "add it to special_tokens"
            )
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
