"""Greedy chunk alignment (ALM_SPEC.md §4.1): properties on random byte strings split two ways, and agreement
with the per-token reference walk in tests/reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.alm_reference import reference_align

from alm import align_chunks
from alm.align import align_sequences
from alm.align.chunks import _offsets, align_many, align_with_loss_masks
from alm.errors import AlignmentError
from alm.templates import token_in_loss

ROLES = ("bos", "header:user", "header:assistant", "eot", "eos")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def two_splits(draw, max_size: int = 48):
    data = draw(st.binary(min_size=1, max_size=max_size))
    cuts = st.lists(st.integers(1, max(1, len(data) - 1)), max_size=len(data))
    return data, split(data, draw(cuts)), split(data, draw(cuts))


def ends(tokens: list[bytes]) -> set[int]:
    return set(np.cumsum([len(t) for t in tokens]).tolist())


def spelled(tokens: list[bytes], start: int, end: int) -> bytes:
    return b"".join(tokens[start:end])


def as_tuples(chunks) -> list[tuple]:
    return list(
        zip(
            chunks.teacher_start.tolist(),
            chunks.teacher_end.tolist(),
            chunks.student_start.tolist(),
            chunks.student_end.tolist(),
            chunks.start_byte.tolist(),
            chunks.end_byte.tolist(),
            chunks.is_block.tolist(),
        )
    )


def ref_tuples(chunks) -> list[tuple]:
    return [
        (
            c.teacher_start,
            c.teacher_end,
            c.student_start,
            c.student_end,
            c.start_byte,
            c.end_byte,
            c.is_block,
        )
        for c in chunks
    ]


@settings(max_examples=150, deadline=None)
@given(two_splits())
def test_chunks_partition_both_sides_after_the_first_chunk(case):
    _, teacher, student = case
    chunks = align_chunks(teacher, student)
    if len(chunks) == 0:
        return
    # Consecutive and gap-free on both sides up to the end of both sequences; the only missing part is the
    # first chunk (it contains position 0).
    assert (chunks.teacher_start[1:] == chunks.teacher_end[:-1]).all()
    assert (chunks.student_start[1:] == chunks.student_end[:-1]).all()
    assert chunks.teacher_end[-1] == len(teacher) and chunks.student_end[-1] == len(student)
    first_common_end = min(ends(teacher) & ends(student))
    assert chunks.start_byte[0] == first_common_end
    assert len(spelled(teacher, 0, chunks.teacher_start[0])) == first_common_end
    assert len(spelled(student, 0, chunks.student_start[0])) == first_common_end


@settings(max_examples=150, deadline=None)
@given(two_splits())
def test_both_sides_of_a_chunk_spell_the_same_bytes(case):
    data, teacher, student = case
    chunks = align_chunks(teacher, student)
    for ts, te, ss, se, start, end, _ in as_tuples(chunks):
        assert spelled(teacher, ts, te) == spelled(student, ss, se) == data[start:end]
        assert len(spelled(teacher, 0, ts)) == len(spelled(student, 0, ss)) == start  # same prefix


@settings(max_examples=150, deadline=None)
@given(two_splits())
def test_chunk_ends_are_exactly_the_common_end_offsets(case):
    _, teacher, student = case
    chunks = align_chunks(teacher, student)
    common = sorted(ends(teacher) & ends(student))
    assert chunks.end_byte.tolist() == common[1:]  # the first one closes the position-0 chunk


@settings(max_examples=100, deadline=None)
@given(two_splits())
def test_byte_level_student_gets_a_chunk_end_at_every_teacher_token_end(case):
    data, teacher, _ = case
    student = [data[i : i + 1] for i in range(len(data))]
    chunks = align_chunks(teacher, student)
    assert chunks.end_byte.tolist() == sorted(ends(teacher))[1:]
    assert (chunks.teacher_end - chunks.teacher_start == 1).all()
    assert (chunks.student_end - chunks.student_start == chunks.end_byte - chunks.start_byte).all()


@settings(max_examples=100, deadline=None)
@given(two_splits())
def test_identical_tokenizations_give_one_token_chunks(case):
    _, teacher, _ = case
    chunks = align_chunks(teacher, list(teacher))
    assert len(chunks) == len(teacher) - 1
    assert (
        chunks.teacher_start.tolist()
        == chunks.student_start.tolist()
        == list(range(1, len(teacher)))
    )
    assert (chunks.teacher_end - chunks.teacher_start == 1).all()


@settings(max_examples=100, deadline=None)
@given(two_splits(), st.integers(0, 60), st.integers(0, 60))
def test_unaligned_tail_after_truncation_is_excluded(case, keep_teacher, keep_student):
    _, teacher, student = case
    teacher, student = teacher[: max(1, keep_teacher)], student[: max(1, keep_student)]
    chunks = align_chunks(teacher, student)
    limit = min(sum(map(len, teacher)), sum(map(len, student)))
    assert (chunks.end_byte <= limit).all()
    assert chunks.end_byte.tolist() == sorted(ends(teacher) & ends(student))[1:]


# --- documents with template blocks -------------------------------------------------------------------------


@st.composite
def documents(draw):
    """A content text with template blocks, rendered two ways (different splits, block lengths, missing roles),
    each side truncated independently, plus loss spans and optional zero-width dummy-prefix tokens."""
    num_segments = draw(st.integers(1, 8))
    segments = []
    for _ in range(num_segments):
        if draw(st.booleans()):
            segments.append(("text", draw(st.binary(min_size=1, max_size=16))))
        else:
            segments.append(("block", draw(st.sampled_from(ROLES))))
    if draw(st.booleans()):
        segments.insert(0, ("block", "bos"))
    sides = []
    for _ in range(2):
        missing = (
            set(draw(st.lists(st.sampled_from(ROLES), max_size=1)))
            if draw(st.booleans())
            else set()
        )
        dummy_prefix = draw(st.booleans())
        tokens, roles = [], []
        for kind, value in segments:
            if kind == "text":
                if dummy_prefix and draw(st.booleans()):
                    tokens.append(b"")  # a lone dummy-prefix token: zero width
                    roles.append(None)
                pieces = split(
                    value,
                    draw(st.lists(st.integers(1, max(1, len(value) - 1)), max_size=len(value))),
                )
                tokens += pieces
                roles += [None] * len(pieces)
            elif value not in missing:
                width = draw(st.integers(1, 2))
                tokens += [b"<" + value.encode() + b">"] * width
                roles += [value] * width
        keep = draw(st.integers(1, max(1, len(tokens)))) if draw(st.booleans()) else len(tokens)
        sides.append((tokens[:keep], roles[:keep], keep < len(tokens)))
    total = sum(len(v) for k, v in segments if k == "text")
    span_points = sorted(draw(st.lists(st.integers(0, total), max_size=4)))
    loss_spans = [(a, b) for a, b in zip(span_points[::2], span_points[1::2])]
    use_spans = draw(st.booleans())
    return sides[0], sides[1], (loss_spans if use_spans else None)


@settings(max_examples=300, deadline=None)
@given(documents())
def test_vectorised_alignment_matches_the_reference_walk(doc):
    (teacher, teacher_roles, teacher_cut), (student, student_roles, student_cut), loss_spans = doc
    chunks = align_chunks(
        teacher,
        student,
        teacher_roles=teacher_roles,
        student_roles=student_roles,
        loss_spans=loss_spans,
        teacher_truncated=teacher_cut,
        student_truncated=student_cut,
    )
    expected = reference_align(
        teacher,
        student,
        teacher_roles,
        student_roles,
        loss_spans,
        teacher_truncated=teacher_cut,
        student_truncated=student_cut,
    )
    assert as_tuples(chunks) == ref_tuples(expected)


@settings(max_examples=200, deadline=None)
@given(documents())
def test_blocks_cut_by_truncation_are_never_matched(doc):
    (teacher, teacher_roles, teacher_cut), (student, student_roles, student_cut), loss_spans = doc
    chunks = align_chunks(
        teacher,
        student,
        teacher_roles=teacher_roles,
        student_roles=student_roles,
        loss_spans=loss_spans,
        teacher_truncated=teacher_cut,
        student_truncated=student_cut,
    )
    blocks = chunks.select(chunks.is_block)
    if teacher_cut:
        assert (blocks.teacher_end < len(teacher)).all()
    if student_cut:
        assert (blocks.student_end < len(student)).all()


@settings(max_examples=200, deadline=None)
@given(documents())
def test_no_header_is_in_the_loss_unless_all_text_is(doc):
    (teacher, teacher_roles, _), (student, student_roles, _), loss_spans = doc
    if loss_spans is None:
        return
    chunks = align_chunks(
        teacher,
        student,
        teacher_roles=teacher_roles,
        student_roles=student_roles,
        loss_spans=loss_spans,
    )
    covered = {byte for start, end in loss_spans for byte in range(start, end)}
    text_bytes = sum(len(t) for t, r in zip(teacher, teacher_roles) if r is None)
    for ts, _, _, _, _, _, is_block in as_tuples(chunks):
        if is_block and teacher_roles[ts] in ("bos", "header:user", "header:assistant"):
            assert covered >= set(range(text_bytes))


@settings(max_examples=200, deadline=None)
@given(documents())
def test_special_blocks_align_by_role_and_one_sided_roles_are_dropped(doc):
    (teacher, teacher_roles, _), (student, student_roles, _), _ = doc
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles
    )
    teacher_role_set = {r for r in teacher_roles if r is not None}
    student_role_set = {r for r in student_roles if r is not None}
    for ts, te, ss, se, _, _, is_block in as_tuples(chunks):
        t_roles, s_roles = set(teacher_roles[ts:te]), set(student_roles[ss:se])
        if is_block:
            assert len(t_roles) == 1 and t_roles == s_roles and None not in t_roles
        else:
            assert (
                t_roles == s_roles == {None}
            )  # a text chunk contains no block token, dropped or not
        # No chunk contains a token whose role is absent on the other side.
        assert not (t_roles - {None}) - student_role_set
        assert not (s_roles - {None}) - teacher_role_set
    assert (chunks.teacher_start > 0).all() and (chunks.student_start > 0).all()


def test_blocks_of_different_lengths_align_as_whole_blocks():
    # Llama-style `<|end_header_id|>` `\n\n` against Gemma-style `\n`: blocks of 2 and 1 tokens (§3).
    teacher = [b"", b"", b"Hi", b" there", b"", b"", b"Yo"]
    teacher_roles = ["bos", "header:user", None, None, "eot", "eot", None]
    student = [b"", b"H", b"i", b" there", b"", b"Y", b"o"]
    student_roles = ["header:user", None, None, None, "eot", None, None]
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles
    )
    # header:user is at position 0 of the student: excluded; bos is teacher-only: dropped.
    assert as_tuples(chunks) == [
        (2, 3, 1, 3, 0, 2, False),
        (3, 4, 3, 4, 2, 8, False),
        (4, 6, 4, 5, 8, 8, True),
        (6, 7, 5, 7, 8, 10, False),
    ]


def test_loss_region_trains_the_closing_block_but_not_the_header():
    teacher = [b"", b"", b"q", b"", b"", b"an", b"swer", b""]
    roles = ["bos", "header:user", None, "eot", "header:assistant", None, None, "eot"]
    student = [b"", b"", b"q", b"", b"", b"a", b"nswer", b""]
    chunks = align_chunks(
        teacher, student, teacher_roles=roles, student_roles=roles, loss_spans=[(1, 7)]
    )
    assert as_tuples(chunks) == [(5, 7, 5, 7, 1, 7, False), (7, 8, 7, 8, 7, 7, True)]


def test_the_next_turns_header_at_the_closing_offset_is_not_in_the_loss():
    # The assistant turn ends at byte 7, where its eot and the next user header both sit: segment order decides.
    teacher = [b"", b"q", b"", b"", b"an", b"swer", b"", b"", b"more", b""]
    roles = [
        "header:user",
        None,
        "eot",
        "header:assistant",
        None,
        None,
        "eot",
        "header:user",
        None,
        "eot",
    ]
    chunks = align_chunks(
        teacher, teacher, teacher_roles=roles, student_roles=roles, loss_spans=[(1, 7)]
    )
    assert as_tuples(chunks) == [
        (4, 5, 4, 5, 1, 3, False),
        (5, 6, 5, 6, 3, 7, False),
        (6, 7, 6, 7, 7, 7, True),
    ]
    everything = align_chunks(
        teacher, teacher, teacher_roles=roles, student_roles=roles, loss_spans=[(0, 11)]
    )
    # With every text trained (`loss: all`), the headers after the first text are trained too.
    assert everything.is_block.sum() == 5 and everything.in_loss.all()


def test_a_truncated_header_is_not_matched_against_a_whole_one():
    # Teacher `[<|im_start|>, user, \n]` cut after two tokens, against a student's one-token header.
    teacher = [b"", b"Hi", b"", b"", b""]
    teacher_roles = ["bos", None, "eot", "header:user", "header:user"]
    student = [b"", b"H", b"i", b"", b""]
    student_roles = ["bos", None, None, "eot", "header:user"]
    whole = align_chunks(teacher, student, teacher_roles=teacher_roles, student_roles=student_roles)
    assert whole.is_block.tolist() == [False, True, True]
    cut = align_chunks(
        teacher,
        student,
        teacher_roles=teacher_roles,
        student_roles=student_roles,
        teacher_truncated=True,
    )
    assert as_tuples(cut) == [(1, 2, 1, 3, 0, 2, False), (2, 3, 3, 4, 2, 2, True)]


def test_zero_width_dummy_prefix_token_joins_the_following_chunk():
    teacher = [b"", b"", b"Hello", b" world"]
    teacher_roles = ["bos", None, None, None]
    student = [b"", b"Hel", b"lo", b" world"]
    student_roles = ["bos", None, None, None]
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles
    )
    assert as_tuples(chunks) == [(1, 3, 1, 3, 0, 5, False), (3, 4, 3, 4, 5, 11, False)]


def test_align_sequences_keeps_outside_loss_chunks_on_request():
    class Seq:
        def __init__(self, lengths):
            self.end_byte = np.cumsum(lengths)
            self.start_byte = self.end_byte - np.asarray(lengths)
            self.role = None

    teacher, student = Seq([1, 2, 2, 3]), Seq([1, 1, 1, 2, 3])
    kept = align_sequences(teacher, student, [(3, 8)], keep_outside_loss=True)
    assert kept.end_byte.tolist() == [3, 5, 8]
    assert kept.in_loss.tolist() == [False, True, True]
    assert align_sequences(teacher, student, [(3, 8)]).end_byte.tolist() == [5, 8]


def test_different_texts_are_refused_with_the_first_differing_byte():
    with pytest.raises(AlignmentError, match="byte 4"):
        align_chunks([b"abc", b"def"], [b"abc", b"dxf"])


@settings(max_examples=150, deadline=None)
@given(st.lists(documents(), min_size=1, max_size=5), st.booleans())
def test_a_micro_batch_aligned_at_once_equals_each_sequence_alone(docs, keep_outside_loss):
    """`align_many` lays the sequences end to end; each result must be the reference walk's (and its masks the
    loss-region rule's), whatever the neighbours: truncated tails, blocks, no loss spans, empty loss spans."""
    pairs, expected = [], []
    for (teacher, t_roles, t_cut), (student, s_roles, s_cut), loss_spans in docs:
        t_side, _ = _offsets(teacher, t_roles, "teacher", t_cut)
        s_side, _ = _offsets(student, s_roles, "student", s_cut)
        pairs.append((t_side, s_side, loss_spans))
        expected.append(
            reference_align(
                teacher,
                student,
                t_roles,
                s_roles,
                loss_spans,
                teacher_truncated=t_cut,
                student_truncated=s_cut,
            )
        )
    results = align_many(pairs, keep_outside_loss=keep_outside_loss)
    assert len(results) == len(pairs) and align_many([]) == []
    for (chunks, t_mask, s_mask), (t_side, s_side, loss_spans), ref in zip(
        results, pairs, expected, strict=True
    ):
        if keep_outside_loss:
            chunks = chunks.select(chunks.in_loss)
        assert as_tuples(chunks) == ref_tuples(ref)
        alone, t_alone, s_alone = align_with_loss_masks(
            t_side, s_side, loss_spans, keep_outside_loss=keep_outside_loss
        )
        for name in ("teacher_start", "end_byte", "in_loss", "is_block"):
            assert getattr(alone, name).dtype == getattr(chunks, name).dtype
        for mask, alone_mask, side in ((t_mask, t_alone, t_side), (s_mask, s_alone, s_side)):
            assert mask.dtype == bool and np.array_equal(mask, alone_mask)
            if loss_spans is None:
                assert mask.all()
            else:
                assert np.array_equal(
                    mask, token_in_loss(side.start_byte, side.end_byte, side.role, loss_spans)
                )


def test_a_loss_span_before_byte_0_does_not_reach_the_previous_sequence():
    first, _ = _offsets([b"ab", b"cd", b"e", b"f"], None, "teacher")
    first_student, _ = _offsets([b"a", b"bc", b"d", b"ef"], None, "student")
    second, _ = _offsets([b"gh", b"ij"], None, "teacher")
    second_student, _ = _offsets([b"g", b"h", b"ij"], None, "student")
    pairs = [(first, first_student, [(0, 2)]), (second, second_student, [(-3, 2)])]
    for (chunks, t_mask, s_mask), (teacher, student, spans) in zip(
        align_many(pairs), pairs, strict=True
    ):
        alone, t_alone, s_alone = align_with_loss_masks(teacher, student, spans)
        assert as_tuples(chunks) == as_tuples(alone)
        assert t_mask.tolist() == t_alone.tolist() and s_mask.tolist() == s_alone.tolist()
    # the first sequence's last byte sits 2 bytes before the second's, within reach of an unclipped (-3, 2)
    assert align_many(pairs)[0][1].tolist() == [True, False, False, False]


def test_a_negative_token_offset_is_refused():
    bad, _ = _offsets([b"ab", b"cd"], None, "teacher")
    shifted = type(bad)(bad.start_byte - 1, bad.end_byte - 1, None)
    with pytest.raises(AlignmentError, match="starts at byte -1"):
        align_sequences(shifted, bad)
