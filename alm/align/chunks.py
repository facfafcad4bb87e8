"""Greedy chunk alignment between a teacher and a student tokenization of the same text (ALM_SPEC.md §4.1, §13).

Owns `Chunks`, `align_sequences` (token offsets + block roles in, chunks out), `align_many` (a micro-batch of
them) and the public `align_chunks` (token byte strings in). NumPy only: must not import torch or `alm.config`.

The algorithm is the "cleaner reimplementation" of §4.1, vectorised:

- **Text.** Chunk boundaries are exactly the byte offsets where a teacher text token and a student text token
  both end (`np.intersect1d` of the two end-offset arrays; zero-width tokens contribute no end). Each text token
  goes to the chunk whose end is the first common end strictly after its start
  (`searchsorted(common_end_byte, start_byte, side="right")`), so a zero-width token such as a lone SentencePiece
  dummy-prefix `▁` joins the chunk that follows it. Tokens after the last common end are the unaligned tail
  (truncation) and belong to no chunk.
- **Blocks.** Consecutive tokens with the same non-None role form a block. The k-th block of a role on the teacher
  side is matched with the k-th block of that role on the student side, and kept only if both sit at the same byte
  offset (and the matched pairs stay in the same order on both sides), and neither may have been cut by
  truncation: on a side whose sequence was truncated, a block that ends at its last token is taken as incomplete.
  Unmatched blocks are dropped; a chunk whose token range would contain a dropped token is dropped too.
- **Validity.** A chunk must be a contiguous, non-empty token range on both sides, and must not contain position 0
  on either side (§5.1: position 0 has no conditional log-prob).
- **Loss region.** A chunk is in the loss iff every token it holds, on both sides, is in the loss by the one rule,
  `alm.templates.token_in_loss` (text by byte span, blocks by segment order).

A micro-batch is aligned at once (`align_many`, what stage two's data path calls): its sequences are laid end to
end, each in its own byte and token range, so each NumPy call above covers all of them and only the template blocks
are visited one by one; each result is exactly the single-sequence one (`align_with_loss_masks` is `align_many` of
one pair). On short chat turns this removes most of the per-sequence cost (~100 NumPy calls).

Imports `alm.templates` (for the loss-region rule) and `alm.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alm.errors import AlignmentError
from alm.templates import (
    TokenizedSequence,
    block_runs,
    blocks_in_loss,
    merged_spans,
    text_in_spans,
)

logger = logging.getLogger(__name__)

_INT = np.int64


@dataclass(frozen=True)
class Chunks:
    """Aligned chunks of one example, sorted by byte offset (and by token position on both sides).

    All arrays have length C. Token ranges are `[start, end)` in each side's own token positions.

    Attributes:
        teacher_start: int64 [C], first teacher token position of each chunk.
        teacher_end: int64 [C], one past the last teacher token position.
        student_start: int64 [C], first student token position.
        student_end: int64 [C], one past the last student token position.
        start_byte: int64 [C], byte offset in the content text where the chunk starts.
        end_byte: int64 [C], byte offset where it ends (equal to `start_byte` for a block chunk).
        is_block: bool [C], True for a template-block chunk (matched by role).
        in_loss: bool [C], True where the chunk lies in the loss region. `align_sequences` only returns chunks
            outside the loss region when asked to (`keep_outside_loss=True`, used for the hidden-state loss).
    """

    teacher_start: np.ndarray
    teacher_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray
    start_byte: np.ndarray
    end_byte: np.ndarray
    is_block: np.ndarray
    in_loss: np.ndarray

    def __len__(self) -> int:
        return len(self.teacher_start)

    def select(self, keep: np.ndarray) -> Chunks:
        """The chunks where the bool mask `keep` [C] is True."""
        return Chunks(
            teacher_start=self.teacher_start[keep],
            teacher_end=self.teacher_end[keep],
            student_start=self.student_start[keep],
            student_end=self.student_end[keep],
            start_byte=self.start_byte[keep],
            end_byte=self.end_byte[keep],
            is_block=self.is_block[keep],
            in_loss=self.in_loss[keep],
        )


@dataclass(frozen=True)
class _Side:
    start_byte: np.ndarray  # int64 [n]
    end_byte: np.ndarray  # int64 [n]
    role: np.ndarray  # object [n]
    is_block: np.ndarray  # bool [n]
    runs: tuple[list[int], list[int], list[Any]]  # `block_runs`: first positions, ends, roles [nb]
    block_start_pos: np.ndarray  # int64 [nb]
    block_role: list[Any]  # [nb]
    block_complete: list[bool]  # [nb]: not cut by truncation


def _side(tokens: Any, name: str) -> _Side:
    start_byte = np.asarray(tokens.start_byte, dtype=_INT)
    end_byte = np.asarray(tokens.end_byte, dtype=_INT)
    n = len(start_byte)
    if end_byte.shape != (n,) or start_byte.ndim != 1:
        raise AlignmentError(
            f"{name} tokens: start_byte and end_byte must be 1-D arrays of the same length, got shapes "
            f"{start_byte.shape} and {end_byte.shape}; pass one entry per token."
        )
    if n and start_byte.min() < 0:
        bad = int(np.argmax(start_byte < 0))
        raise AlignmentError(
            f"{name} token {bad} starts at byte {start_byte[bad]}; offsets are bytes of the content text, >= 0."
        )
    if n and (end_byte < start_byte).any():
        bad = int(np.argmax(end_byte < start_byte))
        raise AlignmentError(
            f"{name} token {bad} ends before it starts ({start_byte[bad]}..{end_byte[bad]}); "
            "offsets must satisfy start_byte <= end_byte."
        )
    role_in = getattr(tokens, "role", None)
    if role_in is None:
        role = np.empty(n, dtype=object)  # NumPy fills object arrays with None
    else:
        role = np.asarray(role_in, dtype=object)  # [n]; no copy for an object array
    if role.shape != (n,):
        raise AlignmentError(
            f"{name} tokens: {len(role)} roles for {n} tokens; give one role (or None) per token."
        )
    runs = tokens.blocks if isinstance(tokens, TokenizedSequence) else None
    if runs is None:
        # element-wise `!= None` on an object array; numpy's stubs do not admit None as an operand
        is_block = np.not_equal(role, None)  # pyright: ignore[reportArgumentType, reportCallIssue]
        runs = block_runs(role, is_block)
    else:  # the runs `role` was built from (`render`, `sequence_from_ids`)
        is_block = np.zeros(n, bool)
        for start, end in zip(runs[0], runs[1], strict=True):
            is_block[start:end] = True
    run_starts, run_ends, run_roles = runs
    # A truncated sequence's last block may be cut; its full length is not known here, so a block reaching the last
    # token counts as incomplete (a block that exactly fills the budget is dropped too: nothing follows it anyway).
    truncated = bool(getattr(tokens, "truncated", False))
    return _Side(
        start_byte,
        end_byte,
        role,
        is_block,
        runs,
        np.asarray(run_starts, dtype=_INT),
        run_roles,
        [not (truncated and end == n) for end in run_ends],
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
        teacher_byte = teacher.start_byte[teacher.runs[0][index]]
        student_byte = student.start_byte[student.runs[0][other]]
        # Keep pairs in the same order on both sides (a crossing pair could not form chunks).
        if teacher_byte == student_byte and other > last_student:
            pairs_teacher.append(index)
            pairs_student.append(other)
            last_student = other
    return np.asarray(pairs_teacher, _INT), np.asarray(pairs_student, _INT)


def _ranges(index: np.ndarray, num_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk: first position, one past the last position, number of tokens."""
    member = index >= 0
    chunk = index[member]  # [m] the chunk of each member token
    positions = np.flatnonzero(member)  # [m] its position
    count = np.bincount(chunk, minlength=num_chunks).astype(_INT, copy=False)
    first = np.empty(num_chunks, _INT)  # (`np.full` is a Python wrapper around these two calls)
    first.fill(len(index))
    last = np.empty(num_chunks, _INT)
    last.fill(-1)
    np.minimum.at(first, chunk, positions)
    np.maximum.at(last, chunk, positions)
    return first, last + 1, count


def _all_in_loss(index: np.ndarray, num_chunks: int, token_in_loss: np.ndarray) -> np.ndarray:
    """Per chunk: every token of this side that belongs to it is in the loss (`token_in_loss` [n])."""
    out = np.ones(num_chunks, bool)
    if token_in_loss.all():
        return out
    chunk = index[~token_in_loss]  # chunks holding a token outside the loss (-1/-2: none)
    out[chunk[chunk >= 0]] = False
    return out


def _sorted_intersection(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Sorted unique common values; O(n log m) by binary search when both inputs are strictly increasing (text
    token ends of real tokenizations are), else `np.intersect1d`."""
    if len(first) == 0 or len(second) == 0:
        return np.zeros(0, _INT)
    if (first[1:] > first[:-1]).all() and (second[1:] > second[:-1]).all():
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
    return align_with_loss_masks(teacher, student, loss_spans, keep_outside_loss=keep_outside_loss)[
        0
    ]


def align_with_loss_masks(
    teacher: Any, student: Any, loss_spans: Any = None, *, keep_outside_loss: bool = False
) -> tuple[Chunks, np.ndarray, np.ndarray]:
    """`align_sequences`, and each side's per-token loss mask it used (bool [n] and [m], `token_in_loss` of the
    teacher and the student tokens with `loss_spans`; all True when `loss_spans` is None), so that the data path
    does not compute the student's SFT mask a second time.

    Raises:
        AlignmentError: malformed offsets.
    """
    return align_many([(teacher, student, loss_spans)], keep_outside_loss=keep_outside_loss)[0]


def align_many(
    pairs: Sequence[tuple[Any, Any, Any]], *, keep_outside_loss: bool = False
) -> list[tuple[Chunks, np.ndarray, np.ndarray]]:
    """`align_with_loss_masks` of each `(teacher, student, loss_spans)` of `pairs` (a micro-batch), computed at
    once: the sequences are laid end to end, each shifted to its own byte range (one byte apart, so no text end,
    chunk or loss span crosses from one to the next) and token range, so every NumPy call covers all of them and
    only the handful of template blocks per sequence is visited one by one. The same result as one call each.

    Raises:
        AlignmentError: malformed offsets (the first sequence that has them).
    """
    num = len(pairs)
    if num == 0:
        return []
    teachers = [_side(teacher, "teacher") for teacher, _, _ in pairs]
    students = [_side(student, "student") for _, student, _ in pairs]
    spans = [None if spans is None else merged_spans(spans) for _, _, spans in pairs]
    # Each sequence's byte range: [byte_shift, byte_shift + width), width past every offset and loss span.
    width = np.empty(num, _INT)
    for i in range(num):
        reach = [0]
        for side in (teachers[i], students[i]):
            if len(side.end_byte):
                reach.append(int(side.end_byte.max()))
        seq_spans = spans[i]
        if seq_spans is not None and len(seq_spans):
            reach.append(int(seq_spans[-1, 1]))  # merged: the last span ends last
        width[i] = max(reach) + 2
    byte_shift = np.cumsum(width) - width  # [B]
    teacher = _joined(teachers, byte_shift)
    student = _joined(students, byte_shift)

    def text_ends(side: _Joined) -> np.ndarray:
        keep = ~side.is_block & (side.end_byte > side.start_byte)
        return side.end_byte[keep]

    # [K], every sequence's common text ends, in order
    common_end_byte = _sorted_intersection(text_ends(teacher), text_ends(student))
    common_seq = np.searchsorted(byte_shift, common_end_byte, side="right") - 1  # [K]
    num_text = len(common_end_byte)
    # Matched template blocks, numbered after the K text chunks, sequence by sequence.
    # joined (first, end) positions of each matched block on each side
    block_teacher_runs: list[tuple[int, int]] = []
    block_student_runs: list[tuple[int, int]] = []
    block_seq: list[int] = []
    block_rank: list[int] = []  # its rank among its sequence's matched blocks
    block_byte: list[int] = []  # joined byte offset
    for i in range(num):
        pairs_teacher, pairs_student = _match_blocks(teachers[i], students[i])
        t_runs, s_runs = teachers[i].runs, students[i].runs
        for rank, (tb, sb) in enumerate(zip(pairs_teacher.tolist(), pairs_student.tolist())):
            first = t_runs[0][tb]
            block_teacher_runs.append(
                (first + teacher.pos_shift[i], t_runs[1][tb] + teacher.pos_shift[i])
            )
            block_student_runs.append(
                (s_runs[0][sb] + student.pos_shift[i], s_runs[1][sb] + student.pos_shift[i])
            )
            block_seq.append(i)
            block_rank.append(rank)
            block_byte.append(int(teachers[i].start_byte[first]) + int(byte_shift[i]))
    num_blocks = len(block_seq)
    num_chunks = num_text + num_blocks

    teacher_index = _joined_chunk_index(teacher, common_end_byte, common_seq, block_teacher_runs)
    student_index = _joined_chunk_index(student, common_end_byte, common_seq, block_student_runs)
    teacher_start, teacher_end, teacher_count = _ranges(teacher_index, num_chunks)
    student_start, student_end, student_count = _ranges(student_index, num_chunks)

    chunk_seq = np.concatenate([common_seq, np.asarray(block_seq, _INT)]).astype(_INT, copy=False)
    end_byte = np.concatenate([common_end_byte, np.asarray(block_byte, _INT)]).astype(
        _INT, copy=False
    )
    # a block chunk starts where it ends; a text chunk at the previous common end of its sequence, or at 0
    start_byte = end_byte.copy()
    if num_text:
        start_byte[1:num_text] = common_end_byte[:-1]
        first_of_seq = np.ones(num_text, bool)
        first_of_seq[1:] = common_seq[1:] != common_seq[:-1]
        start_byte[:num_text][first_of_seq] = byte_shift[common_seq[first_of_seq]]
    is_block = np.zeros(num_chunks, bool)
    is_block[num_text:] = True

    teacher_first = teacher.pos_shift[chunk_seq]  # [C] each chunk's sequence's position 0, joined
    student_first = student.pos_shift[chunk_seq]
    valid = (
        (teacher_count > 0)
        & (student_count > 0)
        & (
            teacher_count == teacher_end - teacher_start
        )  # contiguous: no foreign or dropped token inside
        & (student_count == student_end - student_start)
        & (teacher_start > teacher_first)
        & (student_start > student_first)
    )
    teacher_in_loss = _joined_in_loss(teacher, teachers, spans, byte_shift)
    student_in_loss = _joined_in_loss(student, students, spans, byte_shift)
    in_loss = _all_in_loss(teacher_index, num_chunks, teacher_in_loss) & _all_in_loss(
        student_index, num_chunks, student_in_loss
    )
    if not keep_outside_loss:
        valid &= in_loss
    if num_blocks:
        # Byte order; at one offset the text chunk ending there comes first, then the blocks in token order.
        secondary = np.zeros(num_chunks, _INT)
        secondary[num_text:] = np.asarray(block_rank, _INT) + 1
        order = np.lexsort((secondary, end_byte))
        order = order[valid[order]]
    else:  # text chunks only, whose ends are increasing: already in byte order
        order = np.flatnonzero(valid)
    ordered_seq = chunk_seq[order]
    shift = byte_shift[ordered_seq]
    joined = Chunks(
        teacher_start=teacher_start[order] - teacher_first[order],
        teacher_end=teacher_end[order] - teacher_first[order],
        student_start=student_start[order] - student_first[order],
        student_end=student_end[order] - student_first[order],
        start_byte=start_byte[order] - shift,
        end_byte=end_byte[order] - shift,
        is_block=is_block[order],
        in_loss=in_loss[order],
    )
    # Both sides must advance together; anything else means inconsistent inputs (never seen on real
    # tokenizations, where every matched block offset is also a common text end).
    crossing = (joined.teacher_start[1:] < joined.teacher_end[:-1]) | (
        joined.student_start[1:] < joined.student_end[:-1]
    )
    crossing &= ordered_seq[1:] == ordered_seq[:-1]  # [C - 1], pairs within one sequence
    to_check = set(ordered_seq[1:][crossing].tolist())
    cuts = np.searchsorted(ordered_seq, np.arange(num + 1)).tolist()
    out = []
    for i in range(num):
        first, last = cuts[i], cuts[i + 1]
        chunks = Chunks(*(getattr(joined, name)[first:last] for name in _CHUNK_FIELDS))
        while i in to_check and len(chunks) > 1:
            ok = np.ones(len(chunks), bool)
            ok[1:] = (chunks.teacher_start[1:] >= chunks.teacher_end[:-1]) & (
                chunks.student_start[1:] >= chunks.student_end[:-1]
            )
            if ok.all():
                break
            logger.warning(
                "dropping %d chunks whose token order differs between teacher and student",
                (~ok).sum(),
            )
            chunks = chunks.select(ok)
        out.append(
            (
                chunks,
                teacher_in_loss[teacher.pos_shift[i] : teacher.pos_shift[i + 1]],
                student_in_loss[student.pos_shift[i] : student.pos_shift[i + 1]],
            )
        )
    return out


_CHUNK_FIELDS = (
    "teacher_start",
    "teacher_end",
    "student_start",
    "student_end",
    "start_byte",
    "end_byte",
    "is_block",
    "in_loss",
)


@dataclass(frozen=True)
class _Joined:
    """One side of a micro-batch laid end to end (`align_many`): offsets shifted into each sequence's range."""

    start_byte: np.ndarray  # int64 [N]
    end_byte: np.ndarray  # int64 [N]
    is_block: np.ndarray  # bool [N]
    seq: np.ndarray  # int64 [N]: the sequence of each token
    pos_shift: np.ndarray  # int64 [B + 1]: each sequence's first joined position, then N


def _joined(sides: Sequence[_Side], byte_shift: np.ndarray) -> _Joined:
    lengths = np.asarray([len(side.start_byte) for side in sides], _INT)
    pos_shift = np.zeros(len(sides) + 1, _INT)
    np.cumsum(lengths, out=pos_shift[1:])
    if len(sides) == 1:  # one sequence (shifted by 0): its own arrays, which are only read
        one = sides[0]
        return _Joined(
            one.start_byte,
            one.end_byte,
            one.is_block,
            np.zeros(len(one.start_byte), _INT),
            pos_shift,
        )
    seq = np.repeat(np.arange(len(sides), dtype=_INT), lengths)
    token_shift = byte_shift[seq]
    start_byte = np.concatenate([side.start_byte for side in sides]) + token_shift
    end_byte = np.concatenate([side.end_byte for side in sides]) + token_shift
    is_block = np.concatenate([side.is_block for side in sides])
    return _Joined(start_byte, end_byte, is_block, seq, pos_shift)


def _joined_chunk_index(
    side: _Joined,
    common_end_byte: np.ndarray,
    common_seq: np.ndarray,
    block_runs_joined: Sequence[tuple[int, int]],
) -> np.ndarray:
    """Per joined token: the chunk index (text chunks first, then matched blocks), -1 tail, -2 dropped block token.

    A text token belongs to the first common end strictly after its start if that end is in its own sequence;
    past its sequence's last common end it is in the unaligned tail.
    """
    num_text = len(common_end_byte)
    index = np.empty(len(side.start_byte), _INT)
    text = ~side.is_block
    chunk = np.searchsorted(common_end_byte, side.start_byte[text], side="right").astype(
        _INT, copy=False
    )
    tail = chunk >= num_text
    # several sequences: a common end of a later one is this one's tail too
    if len(side.pos_shift) > 2:
        tail[~tail] = common_seq[chunk[~tail]] != side.seq[text][~tail]
    chunk[tail] = -1  # unaligned tail
    index[text] = chunk
    index[side.is_block] = -2
    for k, (first, end) in enumerate(block_runs_joined):  # a handful of blocks per sequence
        index[first:end] = num_text + k
    return index


def _joined_in_loss(
    side: _Joined,
    sides: Sequence[_Side],
    spans: Sequence[np.ndarray | None],
    byte_shift: np.ndarray,
) -> np.ndarray:
    """bool [N]: `token_in_loss` of every sequence's tokens with its loss spans (True throughout for None)."""
    # Spans are cut at byte 0 first (tokens start there: the same tokens are covered), so that none reaches into
    # the sequence before.
    shifted = [
        np.maximum(s, 0) + byte_shift[i] for i, s in enumerate(spans) if s is not None and len(s)
    ]
    joined_spans = np.concatenate(shifted) if shifted else np.zeros((0, 2), _INT)
    in_loss = text_in_spans(side.start_byte, side.end_byte, joined_spans)
    untrained_text = np.bincount(side.seq[~side.is_block & ~in_loss], minlength=len(sides))
    for i, one in enumerate(sides):
        first_pos = int(side.pos_shift[i])
        if spans[i] is None:  # no loss spans: everything is trained
            in_loss[first_pos : side.pos_shift[i + 1]] = True
        elif one.runs[0]:
            blocks_in_loss(
                in_loss, one.runs, all_text_trained=untrained_text[i] == 0, first_pos=first_pos
            )
    return in_loss


@dataclass(frozen=True)
class _TokenOffsets:
    start_byte: np.ndarray
    end_byte: np.ndarray
    role: list[Any] | None
    truncated: bool = False


def _offsets(
    tokens: Sequence[bytes], roles: Sequence[Any] | None, name: str, truncated: bool = False
) -> tuple[_TokenOffsets, bytes]:
    if roles is not None and len(roles) != len(tokens):
        raise AlignmentError(
            f"{name}_roles has {len(roles)} entries for {len(tokens)} {name} tokens; give one role (or None) per token."
        )
    is_block = [False] * len(tokens) if roles is None else [role is not None for role in roles]
    lengths = np.fromiter(
        (0 if block else len(token) for token, block in zip(tokens, is_block)),
        dtype=_INT,
        count=len(tokens),
    )
    end_byte = np.cumsum(lengths, dtype=_INT)
    text = b"".join(token for token, block in zip(tokens, is_block) if not block)
    offsets = _TokenOffsets(
        end_byte - lengths, end_byte, None if roles is None else list(roles), truncated
    )
    return offsets, text


def align_chunks(
    teacher_tokens: Sequence[bytes],
    student_tokens: Sequence[bytes],
    *,
    teacher_roles: Sequence[str | None] | None = None,
    student_roles: Sequence[str | None] | None = None,
    loss_spans: Any = None,
    teacher_truncated: bool = False,
    student_truncated: bool = False,
) -> Chunks:
    """Greedy ALM chunks between two tokenizations of the same text, given as token byte strings (§4.1).

    Example:
        >>> chunks = align_chunks([b"Hel", b"lo", b" world"], [b"H", b"ello", b" wor", b"ld"])
        >>> chunks.teacher_start.tolist(), chunks.teacher_end.tolist()
        ([2], [3])

    (The first chunk `Hel|lo` vs `H|ello` contains position 0 and is excluded.)

    Args:
        teacher_tokens: the teacher's tokens as the bytes each contributes to the text ([n]).
        student_tokens: the student's tokens ([m]).
        teacher_roles: per teacher token, None for text or a role string (`bos`, `eot`, ...) for template-block
            tokens; block tokens' bytes are ignored (they are not text). Consecutive same-role tokens form one block.
        student_roles: the same for the student.
        loss_spans: int [k, 2] byte ranges of the trainable text, or None for all.
        teacher_truncated: the teacher tokens were cut at a maximum length, so a block ending at the last token may
            be incomplete and is never matched.
        student_truncated: the same for the student.

    Returns:
        `Chunks` with NumPy int64 arrays `teacher_start`, `teacher_end`, `student_start`, `student_end` (end
        exclusive), byte ranges and `is_block`.

    Raises:
        AlignmentError: the two token sequences do not spell the same text (one must be a prefix of the other,
            since either side may be truncated).
    """
    teacher, teacher_text = _offsets(teacher_tokens, teacher_roles, "teacher", teacher_truncated)
    student, student_text = _offsets(student_tokens, student_roles, "student", student_truncated)
    common = min(len(teacher_text), len(student_text))
    if teacher_text[:common] != student_text[:common]:
        first = next(i for i in range(common) if teacher_text[i] != student_text[i])
        raise AlignmentError(
            f"teacher and student tokens spell different text: first difference at byte {first} "
            f"(teacher {teacher_text[first : first + 16]!r}, student {student_text[first : first + 16]!r}); "
            "tokenize the same bytes on both sides (and exclude dummy prefix spaces)."
        )
    return align_sequences(teacher, student, loss_spans)
