"""The stage-two data path as it was before the issue-11 speed-up, kept as the reference for the fast path.

Straightforward versions of what `StudentExampleBuilder.build` and `collate` compute (ALM_SPEC §3-§5): per-token
loss masks by a loop over block tokens, `align_sequences` with its block runs found by NumPy masks, student
tokenization by a plain `tokenizers` encode (no byte lookup, no batch encode) checked against the text,
`render` assembling per-token roles from a list, target building and padding row by row. Copied from `alm` at
commit 339cf2e (changed nothing but the imports, and `render`'s family resolution, taken from b801a20 where the
template families arrived); `tests/train/test_data_path_reference.py`
checks that today's `alm` gives bit-identical examples and batches on random documents. Only for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from alm.align.chunks import Chunks
from alm.align.targets import AlmTargets
from alm.boundary import DEFAULT_BOUNDARY_CLASSES
from alm.errors import AlignmentError, ConfigError, DataError, TokenizerRefusedError
from alm.losses.batch import PaddedTargets
from alm.templates import (
    _TEMPLATE_PREFIX,
    FAMILIES,
    OPENING_BLOCK_ROLES,
    TEMPLATE_BASES,
    Document,
    Segment,
    TokenizedSequence,
    _template_blocks,
    block_token_ids,
    is_template_family,
    resolve_family,
    template_base,
)
from alm.train.batch import StudentBatch, StudentExample
from alm.vocab import TokenizedText, Vocab, complete_utf8_prefix

logger = logging.getLogger(__name__)

_INT = np.int64
_PREFIX_BYTES_PER_TOKEN = 8
_PREFIX_MARGIN_BYTES = 256


def encode_text(tokenizer: Any, vocab: Vocab, text: bytes) -> TokenizedText:
    """The tokenizer's own ids of one text segment (literal markers stay text), checked against the bytes."""
    try:
        body = bytes(text)
        string = body.decode("utf-8")
    except UnicodeDecodeError:
        body = text[: complete_utf8_prefix(text)]
        string = body.decode("utf-8")
    num_bytes = len(body)
    if not body:
        empty = np.zeros(0, dtype=np.int64)
        return TokenizedText(np.zeros(0, dtype=np.int32), empty, empty.copy(), 0)
    token_id = np.asarray(_encode_ids(tokenizer, string), dtype=np.int32)
    dummy = _check_tokens(vocab, token_id, body, "text")
    start_byte, end_byte = _offsets_from_lengths(vocab.token_length[token_id], dummy)
    return TokenizedText(token_id, start_byte, end_byte, num_bytes, dummy)


def token_offsets(vocab: Vocab, token_ids: Any, text: bytes) -> TokenizedText:
    token_id = np.asarray(token_ids, dtype=np.int32)
    dummy = _check_tokens(vocab, token_id, text, "stored text")
    start_byte, end_byte = _offsets_from_lengths(vocab.token_length[token_id], dummy)
    return TokenizedText(token_id, start_byte, end_byte, len(text), dummy)


def build(builder: Any, seq: Any) -> tuple[StudentExample, Chunks]:
    """`StudentExampleBuilder.build(seq)` for the ALM/SFT losses (no baseline, hidden states or evaluation)."""
    teacher = sequence_from_ids(
        builder.teacher_vocab,
        seq.token_id,
        seq.text,
        seq.segments,
        seq.loss_spans,
        truncated=bool(seq.truncated),
    )
    document = document_from_parts(
        bytes(seq.text),
        seq.segments,
        seq.loss_spans,
        doc_id=str(seq.doc_id or ""),
        source=str(seq.source or ""),
        row=int(seq.row),
    )
    student = render(
        document,
        builder.student_tokenizer,
        builder.student_vocab,
        builder.student_family,
        max_length=builder.max_length,
    )
    loss_spans = np.asarray(seq.loss_spans, dtype=np.int64).reshape(-1, 2)
    chunks_all = align_sequences(teacher, student, loss_spans, keep_outside_loss=True)
    teacher_logmass = combine_boundary_classes(
        np.asarray(seq.boundary_logmass), builder.boundary_class_ids
    )
    targets = build_alm_targets(
        chunks_all,
        np.asarray(seq.logp),
        teacher_logmass,
        gamma=builder.gamma,
        debias=builder.debias,
    )
    sft_mask = token_in_loss(student.start_byte, student.end_byte, student.role, loss_spans)
    sft_mask[0] = False
    example = StudentExample(
        input_ids=np.asarray(student.token_id, dtype=np.int64), sft_mask=sft_mask, targets=targets
    )
    return example, chunks_all


def collate(examples: Sequence[StudentExample]) -> StudentBatch:
    """`alm.train.batch.collate` for examples without hidden states, evaluation or baseline inputs."""
    input_ids, attention_mask = _pad_rows([e.input_ids for e in examples], 0)
    sft_mask, _ = _pad_rows([e.sft_mask for e in examples], False)
    return StudentBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        sft_mask=sft_mask,
        num_sft_tokens=sft_mask.sum(),
        targets=pad_targets([e.targets for e in examples]),
    )


def _offsets_from_lengths(lengths: np.ndarray, dummy_prefix: bool) -> tuple[np.ndarray, np.ndarray]:
    end_byte = np.cumsum(lengths, dtype=np.int64)
    start_byte = end_byte - lengths
    if dummy_prefix:
        end_byte = np.maximum(end_byte - 1, 0)
        start_byte = np.maximum(start_byte - 1, 0)
    return start_byte, end_byte


def _check_tokens(vocab: Vocab, ids: np.ndarray, text: bytes, what: str) -> bool:
    """Verify that the tokens' bytes equal `text` (or a dummy space + `text`); return whether a dummy was used."""
    special = vocab.is_special[ids] if len(ids) else np.zeros(0, dtype=bool)
    if special.any():
        pos = int(np.flatnonzero(special)[0])
        token_id = int(ids[pos])
        role = vocab.special_role.get(token_id, "")
        reason = "produced <unk>" if role == "unk" else "produced a special token"
        raise TokenizerRefusedError(
            f"tokenizer {vocab.name!r} {reason} ({vocab.special_text.get(token_id, token_id)!r}, id "
            f"{token_id}) at token {pos} for {what} {_excerpt(text)}: its tokens cannot reproduce the text's "
            "bytes. Use a tokenizer with byte fallback (ALM_SPEC §13.4)."
        )
    joined = vocab.ids_bytes(ids)
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


def _encode_ids(tokenizer: Any, string: str) -> list[int]:
    """Ids of `string` without added special tokens, literal special-token strings kept as text.

    Calls the `tokenizers` backend directly (about 2x faster than `tokenizer(...)`), with `encode_special_tokens`
    set for the call, which is what `tokenizer(..., split_special_tokens=True)` does.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(string, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode(string, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = previous


def merge_spans(spans: Iterable[tuple[int, int]]) -> np.ndarray:
    """int64 [k, 2]: non-empty byte ranges sorted and merged where they touch or overlap."""
    out: list[list[int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in spans if e > s):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _text_in_spans(start_byte: np.ndarray, end_byte: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """bool [n]: `[start, end)` lies inside the union of `spans` (merged, [k, 2]); a zero-width range at o iff the
    byte at o is covered (it belongs to the text that follows it)."""
    if len(spans) == 0:
        return np.zeros(len(start_byte), bool)
    # A zero-width range at o counts as the byte [o, o + 1).
    last_byte_end = np.maximum(end_byte, start_byte + 1)
    if len(spans) == 1:  # the common case: plain text, `loss: all`, one trained turn
        return (start_byte >= spans[0, 0]) & (last_byte_end <= spans[0, 1])
    # the last span starting at or before each token decides (the spans are merged)
    index = np.searchsorted(spans[:, 0], start_byte, side="right") - 1
    return (index >= 0) & (last_byte_end <= spans[np.maximum(index, 0), 1])


def token_in_loss(
    start_byte: Any,
    end_byte: Any,
    role: Sequence[Any] | np.ndarray | None,
    loss_spans: Any,
    *,
    is_block: np.ndarray | None = None,
) -> np.ndarray:
    """Which tokens of one sequence are in the loss region: THE loss-region rule (ALM_SPEC §3, §13.8).

    - A text token is in the loss iff its bytes lie inside the union of the loss spans (a zero-width token, e.g. a
      lone dummy-prefix `▁`, iff the byte it sits before is inside: it belongs to the text that follows).
    - A template block (a run of consecutive tokens with one role) is decided by segment order, never by byte
      offset: a trained turn's `eot` and the next turn's header sit at the same offset. A block is in the loss iff
      the token just before it is; an opening block (`bos`, `header:*`) only when, moreover, every text token of
      the sequence is (`loss: all`, tokenkit's default mask, which trains the template too). So the `eot` closing
      a trained turn is trained and the header opening the next turn is not, and nothing before the first text.

    A chunk (`alm.align`) is in the loss iff every token it holds, on both sides, is.

    Args:
        start_byte, end_byte: int [n], token byte offsets in the content text (blocks: zero width).
        role: [n], None for text tokens, the block role otherwise; None for an all-text sequence.
        loss_spans: int [k, 2] byte ranges `[start, end)` of the trainable text (merged here).
        is_block: bool [n], `role != None`, when the caller has it already (saves a pass over `role`).

    Returns:
        bool [n].
    """
    start = np.asarray(start_byte, dtype=np.int64)
    end = np.asarray(end_byte, dtype=np.int64)
    spans = merge_spans((int(a), int(b)) for a, b in np.asarray(loss_spans).reshape(-1, 2))
    in_loss = _text_in_spans(start, end, spans)
    if role is None:
        return in_loss
    roles = np.asarray(role, dtype=object)  # [n]; no copy for an object array
    block: np.ndarray = (
        # element-wise `!= None` on an object array; numpy's stubs do not admit None as an operand
        np.not_equal(roles, None)  # pyright: ignore[reportArgumentType, reportCallIssue]
        if is_block is None
        else is_block
    )
    all_text_trained = bool(in_loss[~block].all())
    for pos in np.flatnonzero(block).tolist():  # a handful per sequence, in order
        current = roles[pos]
        if pos > 0 and roles[pos - 1] == current:  # inside a run: its first token decided
            in_loss[pos] = in_loss[pos - 1]
        else:
            trained = pos > 0 and bool(in_loss[pos - 1])
            in_loss[pos] = trained and (all_text_trained or current not in OPENING_BLOCK_ROLES)
    return in_loss


def _encode_prefix(tokenizer: Any, vocab: Vocab, text: bytes, max_tokens: int) -> TokenizedText:
    """`encode_text` of `text`, but for very long text only of a prefix long enough for `max_tokens` tokens."""
    cap = max(_PREFIX_BYTES_PER_TOKEN * (max_tokens + 1), 4 * _PREFIX_MARGIN_BYTES)
    while cap < len(text):
        enc = encode_text(tokenizer, vocab, text[:cap])
        # The tokens near the cut may differ from the full text's; accept only if the kept ones end well before.
        if len(enc) > max_tokens and enc.end_byte[max_tokens - 1] <= cap - _PREFIX_MARGIN_BYTES:
            return enc
        cap *= 2
    return encode_text(tokenizer, vocab, text)


def render(
    document: Document,
    tokenizer: Any,
    vocab: Vocab,
    family: str | None = None,
    max_length: int | None = None,
) -> TokenizedSequence:
    """Render `document` for `tokenizer` in `family` and truncate to `max_length` tokens.

    Args:
        document: abstract segments.
        tokenizer: HF tokenizer; `vocab` must be its `Vocab`.
        vocab: from `alm.vocab.vocab_from_tokenizer(tokenizer)`.
        family: `chatml`, `llama3`, `gemma`, `plain`, or None/`auto` to detect it from the tokenizer.
        max_length: keep at most this many tokens (None: no limit).

    Returns:
        The `TokenizedSequence` (offsets in the content text, segment table, loss spans, truncation, covered text).

    Raises:
        TokenizerRefusedError: a text segment's bytes cannot be reproduced, or a block's special token is missing.
        ConfigError: an unknown family, or a chat block in the `plain` family.
        DataError: a text segment is not valid UTF-8.
    """
    # `auto` is resolved here; a given family is taken as resolved (the bare `template` of older stores keeps its
    # meaning: the tokenizer's own bos/eos for plain documents)
    family = resolve_family(family, tokenizer) if family is None or family == "auto" else family
    if not (
        family in FAMILIES
        or (family.startswith(_TEMPLATE_PREFIX) and template_base(family) in TEMPLATE_BASES)
    ):
        raise ConfigError(
            f"template family {family!r} is unknown; use one of {[*FAMILIES, 'auto']}"
        )
    if max_length is not None and max_length < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    # the tokenizer's own template renders the chat blocks; bos/eos of plain documents are its bos/eos tokens
    templated = is_template_family(family)
    template_blocks = _template_blocks(document, tokenizer) if templated else {}
    block_family = template_base(family) if templated else family
    budget = max_length if max_length is not None else None
    id_parts: list[np.ndarray] = []
    start_parts: list[np.ndarray] = []
    end_parts: list[np.ndarray] = []
    roles: list[Any] = []
    segments: list[dict[str, Any]] = []
    content_byte = 0
    pos = 0
    for seg_index, seg in enumerate(document.segments):
        if budget is not None and pos > budget:
            break
        if seg.role == "text":
            if budget is None:
                enc = encode_text(tokenizer, vocab, seg.text)
            else:
                enc = _encode_prefix(tokenizer, vocab, seg.text, budget - pos + 1)
            ids, start, end = (
                enc.token_id,
                enc.start_byte + content_byte,
                enc.end_byte + content_byte,
            )
            roles.extend([None] * len(ids))
            seg_end_byte = content_byte + len(seg.text)
        else:
            ids = (
                template_blocks[seg_index]
                if seg_index in template_blocks
                else block_token_ids(block_family, seg.role, tokenizer, vocab)
            )
            start = np.full(len(ids), content_byte, dtype=np.int64)
            end = start.copy()
            roles.extend([seg.role] * len(ids))
            seg_end_byte = content_byte
        segments.append(
            {
                "role": seg.role,
                "start_byte": content_byte,
                "end_byte": seg_end_byte,
                "start_pos": pos,
                "end_pos": pos + len(ids),
            }
        )
        id_parts.append(ids)
        start_parts.append(start)
        end_parts.append(end)
        content_byte = seg_end_byte
        pos += len(ids)

    token_id = np.concatenate(id_parts).astype(np.int32) if id_parts else np.zeros(0, np.int32)
    start_byte = (
        np.concatenate(start_parts).astype(np.int64) if start_parts else np.zeros(0, np.int64)
    )
    end_byte = np.concatenate(end_parts).astype(np.int64) if end_parts else np.zeros(0, np.int64)
    role = np.empty(len(roles), dtype=object)
    role[:] = roles
    content = document.content_text
    truncated = budget is not None and len(token_id) > budget
    if truncated:
        covered = int(start_byte[budget])
        token_id, start_byte, end_byte, role = (
            token_id[:budget],
            start_byte[:budget],
            end_byte[:budget],
            role[:budget],
        )
        kept = []
        for s in segments:
            if s["start_pos"] >= budget:
                break
            kept.append(
                {
                    **s,
                    "end_byte": min(s["end_byte"], covered),
                    "end_pos": min(s["end_pos"], budget),
                }
            )
        segments = kept
    else:
        covered = len(content)
    spans = document.loss_spans()
    spans = merge_spans((s, min(e, covered)) for s, e in spans)
    return TokenizedSequence(
        token_id=token_id,
        start_byte=start_byte,
        end_byte=end_byte,
        role=role,
        segments=segments,
        loss_spans=spans,
        truncated=bool(truncated),
        text=content[:covered],
        doc_id=document.doc_id,
        source=document.source,
        row=document.row,
    )


def _segment_dicts(segments: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    keys = ("start_byte", "end_byte", "start_pos", "end_pos")
    return [{"role": str(seg["role"]), **{k: int(seg[k]) for k in keys}} for seg in segments]


def sequence_from_ids(
    vocab: Vocab,
    token_id: Any,
    text: bytes,
    segments: Iterable[Mapping[str, Any]],
    loss_spans: Any = None,
    *,
    truncated: bool = False,
) -> TokenizedSequence:
    """Per-token offsets and roles of a *stored* teacher sequence (stage two).

    Args:
        vocab: the teacher `Vocab`.
        token_id: int [n] stored teacher ids.
        text: the stored content bytes.
        segments: the stored segment table, dicts `{role, start_byte, end_byte, start_pos, end_pos}`.
        loss_spans: optional [k, 2] byte ranges to carry along.
        truncated: the stored truncation flag, carried along.

    Raises:
        TokenizerRefusedError: a text segment's ids do not reproduce its bytes.
        DataError: the segment table does not tile the tokens.
    """
    ids = np.asarray(token_id, dtype=np.int32)
    table = _segment_dicts(segments)
    start_byte = np.zeros(len(ids), dtype=np.int64)
    end_byte = np.zeros(len(ids), dtype=np.int64)
    role = np.empty(len(ids), dtype=object)
    pos = 0
    for seg in table:
        sp, ep, sb, eb = seg["start_pos"], seg["end_pos"], seg["start_byte"], seg["end_byte"]
        if sp != pos or ep < sp or ep > len(ids) or eb < sb or eb > len(text):
            raise DataError(
                f"stored segment {seg} does not continue at token {pos} within {len(ids)} tokens and "
                f"{len(text)} bytes: the store's segment table is corrupt"
            )
        if seg["role"] == "text":
            enc = token_offsets(vocab, ids[sp:ep], text[sb:eb])
            start_byte[sp:ep] = enc.start_byte + sb
            end_byte[sp:ep] = enc.end_byte + sb
            role[sp:ep] = None
        else:
            start_byte[sp:ep] = sb
            end_byte[sp:ep] = sb
            role[sp:ep] = seg["role"]
        pos = ep
    if pos != len(ids):
        raise DataError(
            f"stored segments cover {pos} of {len(ids)} tokens: the segment table is corrupt"
        )
    spans = (
        np.zeros((0, 2), np.int64)
        if loss_spans is None
        else np.asarray(loss_spans, dtype=np.int64).reshape(-1, 2)
    )
    return TokenizedSequence(ids, start_byte, end_byte, role, table, spans, truncated, bytes(text))


def document_from_parts(
    text: bytes,
    segments: Iterable[Mapping[str, Any]],
    loss_spans: Any = None,
    *,
    doc_id: str = "",
    source: str = "",
    row: int = -1,
) -> Document:
    """The abstract document behind a stored sequence, for a student to re-render with its own family.

    Text segments take their bytes from `text` and are in the loss iff their (non-empty) span lies inside the
    loss spans (`token_in_loss`'s text rule); blocks keep their role (including blocks the teacher's family
    rendered as nothing).

    Args:
        text: the stored content bytes.
        segments: the stored segment table (dicts, as `sequence_from_ids`).
        loss_spans: [k, 2] byte ranges of in-loss text, or None.
        doc_id, source, row: provenance carried into the document.

    Raises:
        DataError: a segment lies outside `text`.
    """
    text = bytes(text)
    spans = (
        np.zeros((0, 2), np.int64)
        if loss_spans is None
        else merge_spans((int(a), int(b)) for a, b in np.asarray(loss_spans).reshape(-1, 2))
    )
    out: list[Segment] = []
    for seg in _segment_dicts(segments):
        sb, eb = seg["start_byte"], seg["end_byte"]
        if not 0 <= sb <= eb <= len(text):
            raise DataError(f"stored segment {seg} lies outside the text ({len(text)} bytes)")
        if seg["role"] == "text":
            in_loss = eb > sb and bool(_text_in_spans(np.array([sb]), np.array([eb]), spans)[0])
            out.append(Segment("text", text[sb:eb], in_loss))
        else:
            out.append(Segment(seg["role"]))
    return Document(doc_id, source, row, tuple(out))


@dataclass(frozen=True)
class _Side:
    start_byte: np.ndarray  # int64 [n]
    end_byte: np.ndarray  # int64 [n]
    role: np.ndarray  # object [n]
    is_block: np.ndarray  # bool [n]
    block_start_pos: np.ndarray  # int64 [nb]
    block_end_pos: np.ndarray  # int64 [nb]
    block_role: list[Any]  # [nb]
    block_complete: np.ndarray  # bool [nb]: not cut by truncation


def _side(tokens: Any, name: str) -> _Side:
    start_byte = np.asarray(tokens.start_byte, dtype=_INT)
    end_byte = np.asarray(tokens.end_byte, dtype=_INT)
    n = len(start_byte)
    if end_byte.shape != (n,) or start_byte.ndim != 1:
        raise AlignmentError(
            f"{name} tokens: start_byte and end_byte must be 1-D arrays of the same length, got shapes "
            f"{start_byte.shape} and {end_byte.shape}; pass one entry per token."
        )
    if n and np.any(end_byte < start_byte):
        bad = int(np.argmax(end_byte < start_byte))
        raise AlignmentError(
            f"{name} token {bad} ends before it starts ({start_byte[bad]}..{end_byte[bad]}); "
            "offsets must satisfy start_byte <= end_byte."
        )
    role_in = getattr(tokens, "role", None)
    if role_in is None:
        role = np.full(n, None, dtype=object)
    else:
        role = np.asarray(role_in, dtype=object)  # [n]; no copy for an object array
    if role.shape != (n,):
        raise AlignmentError(
            f"{name} tokens: {len(role)} roles for {n} tokens; give one role (or None) per token."
        )
    # element-wise `!= None` on an object array; numpy's stubs do not admit None as an operand
    is_block = np.not_equal(role, None)  # pyright: ignore[reportArgumentType, reportCallIssue]
    block_pos = np.flatnonzero(is_block).astype(_INT)
    # A block starts where the previous token is not a block token or has another role; roles are compared
    # only among block tokens (a handful per sequence).
    block_role = role[block_pos]
    starts = np.ones(len(block_pos), bool)
    starts[1:] = (block_pos[1:] != block_pos[:-1] + 1) | (block_role[1:] != block_role[:-1])
    first = np.flatnonzero(starts)
    last = np.append(first[1:] - 1, len(block_pos) - 1).astype(_INT)
    block_end_pos = block_pos[last] + 1 if len(block_pos) else np.zeros(0, _INT)
    # A truncated sequence's last block may be cut; its full length is not known here, so a block reaching the last
    # token counts as incomplete (a block that exactly fills the budget is dropped too: nothing follows it anyway).
    truncated = bool(getattr(tokens, "truncated", False))
    return _Side(
        start_byte,
        end_byte,
        role,
        is_block,
        block_pos[first],
        block_end_pos,
        list(block_role[first]),
        ~(truncated & (block_end_pos == n)),
    )


def _match_blocks(teacher: _Side, student: _Side) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (teacher block index, student block index): k-th occurrence of a role on each side, same offset.

    Loops over blocks, not tokens (a handful per sequence).
    """
    student_index: dict[tuple[Any, int], int] = {}
    seen: dict[Any, int] = {}
    for index, role in enumerate(student.block_role):
        occurrence = seen.get(role, 0)
        seen[role] = occurrence + 1
        student_index[(role, occurrence)] = index
    pairs_teacher: list[int] = []
    pairs_student: list[int] = []
    seen = {}
    last_student = -1
    for index, role in enumerate(teacher.block_role):
        occurrence = seen.get(role, 0)
        seen[role] = occurrence + 1
        other = student_index.get((role, occurrence))
        if other is None or not (teacher.block_complete[index] and student.block_complete[other]):
            continue
        teacher_byte = teacher.start_byte[teacher.block_start_pos[index]]
        student_byte = student.start_byte[student.block_start_pos[other]]
        # Keep pairs in the same order on both sides (a crossing pair could not form chunks).
        if teacher_byte == student_byte and other > last_student:
            pairs_teacher.append(index)
            pairs_student.append(other)
            last_student = other
    return np.asarray(pairs_teacher, _INT), np.asarray(pairs_student, _INT)


def _token_chunk_index(
    side: _Side, common_end_byte: np.ndarray, matched_blocks: np.ndarray, num_text_chunks: int
) -> np.ndarray:
    """Per token: the chunk index (text chunks first, then matched blocks), -1 tail, -2 dropped block token."""
    n = len(side.start_byte)
    index = np.empty(n, _INT)
    text = ~side.is_block
    chunk = np.searchsorted(common_end_byte, side.start_byte[text], side="right").astype(_INT)
    chunk[chunk >= num_text_chunks] = -1  # unaligned tail
    index[text] = chunk
    index[side.is_block] = -2
    if len(matched_blocks):
        lengths = side.block_end_pos[matched_blocks] - side.block_start_pos[matched_blocks]
        positions = np.repeat(side.block_start_pos[matched_blocks], lengths) + (
            np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        index[positions] = num_text_chunks + np.repeat(np.arange(len(matched_blocks)), lengths)
    return index


def _ranges(index: np.ndarray, num_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk: first position, one past the last position, number of tokens."""
    positions = np.arange(len(index), dtype=_INT)
    member = index >= 0
    count = np.bincount(index[member], minlength=num_chunks).astype(_INT)
    first = np.full(num_chunks, len(index), _INT)
    last = np.full(num_chunks, -1, _INT)
    np.minimum.at(first, index[member], positions[member])
    np.maximum.at(last, index[member], positions[member])
    return first, last + 1, count


def _all_in_loss(side: _Side, index: np.ndarray, num_chunks: int, loss_spans: Any) -> np.ndarray:
    """Per chunk: every token of this side that belongs to it is in the loss (`token_in_loss`)."""
    in_loss = token_in_loss(
        side.start_byte, side.end_byte, side.role, loss_spans, is_block=side.is_block
    )
    chunk = index[np.flatnonzero(~in_loss)]  # chunks holding a token outside the loss (-1/-2: none)
    out = np.ones(num_chunks, bool)
    out[chunk[chunk >= 0]] = False
    return out


def _sorted_intersection(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Sorted unique common values; O(n log m) by binary search when both inputs are strictly increasing (text
    token ends of real tokenizations are), else `np.intersect1d`."""
    if len(first) == 0 or len(second) == 0:
        return np.zeros(0, _INT)
    if np.all(first[1:] > first[:-1]) and np.all(second[1:] > second[:-1]):
        if len(first) > len(second):
            first, second = second, first
        index = np.minimum(np.searchsorted(second, first), len(second) - 1)
        return first[second[index] == first]
    return np.intersect1d(first, second)


def align_sequences(
    teacher: Any, student: Any, loss_spans: Any = None, *, keep_outside_loss: bool = False
) -> Chunks:
    """Greedy chunks between two token sequences of the same content text (§4.1).

    Args:
        teacher: object with per-token `start_byte`, `end_byte` (int64 [n], offsets in the content text; block
            tokens have zero width at the block's offset; a dummy prefix space is excluded) and `role` (None for
            text tokens, the block role string otherwise; `role` itself may be None for an all-text sequence), and
            optionally `truncated` (bool: cut at a maximum length, so its last block may be incomplete).
            A `TokenizedSequence` from `alm.templates.render` or a `StoredSequence`-derived object fits.
        student: the same for the student tokenization.
        loss_spans: int64 [k, 2] byte ranges `(start_byte, end_byte)` of the trainable text, or None to train on
            everything.
        keep_outside_loss: also return aligned chunks outside the loss region (with `in_loss=False`); the
            hidden-state loss uses them (§7.1: loss masks are not applied there).

    Returns:
        The valid chunks, sorted: none contains position 0 on either side, none lies in the unaligned tail after
        truncation, none contains a dropped (one-sided or truncated) block token.

    Raises:
        AlignmentError: malformed offsets.
    """
    teacher_side = _side(teacher, "teacher")
    student_side = _side(student, "student")

    def text_ends(side: _Side) -> np.ndarray:
        keep = ~side.is_block & (side.end_byte > side.start_byte)
        return side.end_byte[keep]

    common_end_byte = _sorted_intersection(text_ends(teacher_side), text_ends(student_side))
    num_text = len(common_end_byte)
    teacher_blocks, student_blocks = _match_blocks(teacher_side, student_side)
    num_chunks = num_text + len(teacher_blocks)

    teacher_index = _token_chunk_index(teacher_side, common_end_byte, teacher_blocks, num_text)
    student_index = _token_chunk_index(student_side, common_end_byte, student_blocks, num_text)
    teacher_start, teacher_end, teacher_count = _ranges(teacher_index, num_chunks)
    student_start, student_end, student_count = _ranges(student_index, num_chunks)

    block_byte = teacher_side.start_byte[teacher_side.block_start_pos[teacher_blocks]]
    start_byte = np.concatenate(
        [np.concatenate([[0], common_end_byte[:-1]]).astype(_INT)[:num_text], block_byte]
    )
    end_byte = np.concatenate([common_end_byte, block_byte]).astype(_INT)
    is_block = np.concatenate([np.zeros(num_text, bool), np.ones(len(teacher_blocks), bool)])
    # Byte order; at one offset the text chunk ending there comes first, then the blocks in token order.
    secondary = np.concatenate(
        [np.zeros(num_text, _INT), 1 + np.arange(len(teacher_blocks), dtype=_INT)]
    )

    valid = (
        (teacher_count > 0)
        & (student_count > 0)
        & (
            teacher_count == teacher_end - teacher_start
        )  # contiguous: no foreign or dropped token inside
        & (student_count == student_end - student_start)
        & (teacher_start > 0)
        & (student_start > 0)
    )
    if loss_spans is None:
        in_loss = np.ones(num_chunks, bool)
    else:
        in_loss = _all_in_loss(teacher_side, teacher_index, num_chunks, loss_spans) & _all_in_loss(
            student_side, student_index, num_chunks, loss_spans
        )
    if not keep_outside_loss:
        valid &= in_loss
    order = np.lexsort((secondary, end_byte))
    order = order[valid[order]]
    chunks = Chunks(
        teacher_start=teacher_start[order],
        teacher_end=teacher_end[order],
        student_start=student_start[order],
        student_end=student_end[order],
        start_byte=start_byte[order],
        end_byte=end_byte[order],
        is_block=is_block[order],
        in_loss=in_loss[order],
    )
    # Both sides must advance together; anything else means inconsistent inputs (never seen on real
    # tokenizations, where every matched block offset is also a common text end).
    while len(chunks) > 1:
        ok = np.ones(len(chunks), bool)
        ok[1:] = (chunks.teacher_start[1:] >= chunks.teacher_end[:-1]) & (
            chunks.student_start[1:] >= chunks.student_end[:-1]
        )
        if ok.all():
            break
        logger.warning(
            "dropping %d chunks whose token order differs between teacher and student", (~ok).sum()
        )
        chunks = chunks.select(ok)
    return chunks


def build_alm_targets(
    chunks: Chunks,
    teacher_logp: np.ndarray,
    teacher_boundary_logmass: np.ndarray,
    *,
    gamma: float = 0.1,
    drop_unterminated_groups: bool = True,
    debias: bool = True,
) -> AlmTargets:
    """Teacher chunk log-probs, γ-merged groups and debiased group log-probs for one example.

    Args:
        chunks: the example's chunks from `align_sequences` (chunks with `in_loss=False` only feed the
            hidden-state positions).
        teacher_logp: float [n], `logp[q] = log p_T(token_q | tokens[:q])`, NaN at q = 0 (never used: no chunk
            contains position 0). Summed in float64 by prefix sums.
        teacher_boundary_logmass: float [n], log of the teacher's next-token probability mass on the chosen
            boundary set after token q (the caller combines the stored classes with logsumexp).
        gamma: merging threshold; a chunk ends a group iff `exp(boundary log-mass at its last token) > gamma`.
        drop_unterminated_groups: drop a group that ends on a text chunk whose boundary probability is ≤ gamma
            (see the module docstring).
        debias: add the boundary log-mass at the group's last token to the group log-prob (append_space, §5.2;
            the paper's Table 8 ablation turns it off). Merging and dropping still follow `gamma` either way.

    Returns:
        `AlmTargets`.

    Raises:
        AlignmentError: the chunks reach past the teacher arrays, or a log-prob inside a chunk is NaN.
    """
    logp = np.asarray(teacher_logp, dtype=np.float64)
    boundary_logmass = np.minimum(np.asarray(teacher_boundary_logmass, dtype=np.float64), 0.0)
    n = len(logp)
    if boundary_logmass.shape != (n,):
        raise AlignmentError(
            f"teacher_boundary_logmass has shape {boundary_logmass.shape}, expected ({n},) like teacher_logp; "
            "combine the stored [n, 5] classes into one column with logsumexp first."
        )
    if len(chunks) and int(chunks.teacher_end.max()) > n:
        raise AlignmentError(
            f"chunks reach teacher position {int(chunks.teacher_end.max())} but the teacher has {n} tokens; "
            "align against the same teacher tokens whose log-probs you pass."
        )
    # prefix[q] = Σ_{1 <= r < q} logp[r]; position 0 contributes nothing (§5.1).
    body = logp.copy()
    if n:
        body[0] = 0.0
    prefix = np.zeros(n + 1)
    np.cumsum(body, out=prefix[1:])

    loss_chunks = chunks.select(chunks.in_loss)
    teacher_start, teacher_end = loss_chunks.teacher_start, loss_chunks.teacher_end
    student_start, student_end = loss_chunks.student_start, loss_chunks.student_end
    chunk_logp = np.minimum(
        prefix[teacher_end] - prefix[teacher_start], 0.0
    )  # [C'] clipped per chunk (§5.1)
    if np.isnan(chunk_logp).any():
        bad = int(np.flatnonzero(np.isnan(chunk_logp))[0])
        raise AlignmentError(
            f"teacher log-prob is NaN inside chunk {bad} (teacher positions {teacher_start[bad]}..{teacher_end[bad]}); "
            "only position 0 of a sequence may be NaN. Check the teacher store."
        )
    chunk_boundary = boundary_logmass[teacher_end - 1] if len(loss_chunks) else np.zeros(0)  # [C']
    is_boundary = np.exp(chunk_boundary) > gamma  # strict (§5.3)

    ends_group = is_boundary.copy()
    if len(loss_chunks):
        adjacent = (teacher_start[1:] == teacher_end[:-1]) & (student_start[1:] == student_end[:-1])
        ends_group[:-1] |= ~adjacent
        ends_group[-1] = True
    group_last = np.flatnonzero(ends_group)
    group_first = np.concatenate([[0], group_last[:-1] + 1]).astype(_INT)[: len(group_last)]
    # [G] no append_space after a block, and none at all without debiasing
    has_boundary_term = ~loss_chunks.is_block[group_last] & debias
    group_logp = (
        np.add.reduceat(chunk_logp, group_first) if len(group_last) else np.zeros(0)
    ) + np.where(has_boundary_term, chunk_boundary[group_last], 0.0)
    keep = np.ones(len(group_last), bool)
    if drop_unterminated_groups:
        keep = is_boundary[group_last] | loss_chunks.is_block[group_last]
    group_first, group_last, group_logp = group_first[keep], group_last[keep], group_logp[keep]
    has_boundary_term = has_boundary_term[keep]

    return AlmTargets(
        teacher_group_logp=group_logp.astype(np.float32),
        teacher_group_start=teacher_start[group_first],
        teacher_group_end=teacher_end[group_last],
        student_group_start=student_start[group_first],
        student_group_end=student_end[group_last],
        teacher_group_last_pos=teacher_end[group_last] - 1,
        student_group_last_pos=student_end[group_last] - 1,
        teacher_chunk_last_pos=chunks.teacher_end - 1,
        student_chunk_last_pos=chunks.student_end - 1,
        group_has_boundary_term=has_boundary_term,
    )


def combine_boundary_classes(
    boundary_logmass: np.ndarray, classes: tuple[int, ...] = DEFAULT_BOUNDARY_CLASSES
) -> np.ndarray:
    """Log-mass of a union of the stored first-byte classes: logsumexp over `classes` of [n, 5] → float64 [n].

    The default is `alm.boundary.DEFAULT_BOUNDARY_CLASSES`, tokenkit's `space+tab+newline+special` (§5.2), the
    same set `alm train` uses by default.
    """
    stored = np.asarray(boundary_logmass, dtype=np.float64)[:, list(classes)]
    top = np.max(stored, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.minimum(
            (top + np.log(np.exp(stored - top).sum(axis=1, keepdims=True)))[:, 0], 0.0
        )


def _pad(arrays: list[np.ndarray], width: int, fill: float, dtype: npt.DTypeLike) -> torch.Tensor:
    out = np.full((len(arrays), width), fill, dtype=dtype)
    for row, values in enumerate(arrays):
        out[row, : len(values)] = values
    return torch.from_numpy(out)


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.int64)[:, None]


def pad_targets(examples: Sequence[AlmTargets]) -> PaddedTargets:
    """Stack per-example `AlmTargets` (from `alm.align.build_alm_targets`) into padded CPU tensors."""
    num_groups = [example.num_groups for example in examples]
    num_chunks = [example.num_chunks for example in examples]
    group_width = max([1, *num_groups])
    chunk_width = max([1, *num_chunks])

    def groups(field: str) -> torch.Tensor:
        return _pad([getattr(e, field) for e in examples], group_width, -1, np.int64)

    def chunks(field: str) -> torch.Tensor:
        return _pad([getattr(e, field) for e in examples], chunk_width, -1, np.int64)

    return PaddedTargets(
        teacher_group_logp=_pad(
            [e.teacher_group_logp for e in examples], group_width, 0.0, np.float32
        ),
        teacher_group_start=groups("teacher_group_start"),
        teacher_group_end=groups("teacher_group_end"),
        teacher_group_last_pos=groups("teacher_group_last_pos"),
        student_group_start=groups("student_group_start"),
        student_group_end=groups("student_group_end"),
        student_group_last_pos=groups("student_group_last_pos"),
        group_mask=_mask(num_groups, group_width),
        group_has_boundary_term=_pad(
            [e.group_has_boundary_term for e in examples], group_width, False, np.bool_
        ),
        teacher_chunk_last_pos=chunks("teacher_chunk_last_pos"),
        student_chunk_last_pos=chunks("student_chunk_last_pos"),
        chunk_mask=_mask(num_chunks, chunk_width),
        num_groups=torch.tensor(sum(num_groups), dtype=torch.int64),
        num_chunks=torch.tensor(sum(num_chunks), dtype=torch.int64),
    )


def _pad_rows(rows: list[np.ndarray], fill: float | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D (or [n, d]) arrays to [B, max(1, longest)(, d)]; also the bool [B, L] mask of real rows."""
    length = max([1, *(len(row) for row in rows)])
    out = np.full((len(rows), length, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)
