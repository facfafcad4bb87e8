"""Teacher-side targets (ALM_SPEC.md §5): prefix-sum chunk log-probs, γ-merging, debiasing; against the reference
loop and pinned numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.alm_reference import RefChunk, reference_align, reference_groups

from alm import align_chunks
from alm.align import build_alm_targets, combine_boundary_classes
from alm.errors import AlignmentError

LOG = math.log


def pinned_chunks():
    teacher = [b"", b"The", b" cat", b" sat"]
    student = [b"", b"T", b"he", b" c", b"at", b" sat"]
    roles_t, roles_s = ["bos", None, None, None], ["bos", None, None, None, None, None]
    return align_chunks(teacher, student, teacher_roles=roles_t, student_roles=roles_s)


PINNED_LOGP = np.array([np.nan, -1.0, -2.0, -0.5])
PINNED_BOUNDARY = np.log([0.5, 0.05, 0.3, 0.9])


def test_pinned_merging_and_debiasing():
    targets = build_alm_targets(pinned_chunks(), PINNED_LOGP, PINNED_BOUNDARY, gamma=0.1)
    # Chunk "The" ends where the boundary probability is 0.05 ≤ γ, so it merges with " cat".
    np.testing.assert_allclose(
        targets.teacher_group_logp, [-3.0 + LOG(0.3), -0.5 + LOG(0.9)], rtol=1e-6
    )
    assert targets.student_group_start.tolist() == [1, 5]
    assert targets.student_group_end.tolist() == [5, 6]
    assert targets.student_group_last_pos.tolist() == [4, 5]
    assert targets.teacher_group_last_pos.tolist() == [2, 3]
    assert targets.teacher_chunk_last_pos.tolist() == [1, 2, 3]
    assert targets.student_chunk_last_pos.tolist() == [2, 4, 5]


def test_gamma_zero_merges_nothing():
    targets = build_alm_targets(pinned_chunks(), PINNED_LOGP, PINNED_BOUNDARY, gamma=0.0)
    np.testing.assert_allclose(
        targets.teacher_group_logp, [-1.0 + LOG(0.05), -2.0 + LOG(0.3), -0.5 + LOG(0.9)], rtol=1e-6
    )
    assert targets.student_group_start.tolist() == [1, 3, 5]


def test_unterminated_trailing_group_is_dropped_by_default_and_kept_on_request():
    boundary = np.log([0.5, 0.9, 0.05, 0.05])  # the last chunk ends on a 0.05 boundary
    dropped = build_alm_targets(pinned_chunks(), PINNED_LOGP, boundary, gamma=0.1)
    assert dropped.teacher_group_logp.tolist() == pytest.approx([-1.0 + LOG(0.9)])
    kept = build_alm_targets(
        pinned_chunks(), PINNED_LOGP, boundary, gamma=0.1, drop_unterminated_groups=False
    )
    np.testing.assert_allclose(
        kept.teacher_group_logp, [-1.0 + LOG(0.9), -2.5 + LOG(0.05)], rtol=1e-6
    )


def test_chunk_log_probs_are_clipped_to_zero_before_summing():
    logp = np.array([np.nan, 1e-3, -2.0, -0.5])  # a slightly positive stored log-prob (rounding)
    targets = build_alm_targets(pinned_chunks(), logp, PINNED_BOUNDARY, gamma=0.0)
    assert targets.teacher_group_logp[0] == pytest.approx(LOG(0.05))


def test_nan_inside_a_chunk_is_refused():
    logp = PINNED_LOGP.copy()
    logp[2] = np.nan
    with pytest.raises(AlignmentError, match="NaN"):
        build_alm_targets(pinned_chunks(), logp, PINNED_BOUNDARY)


def test_combine_boundary_classes_is_logsumexp_of_the_chosen_classes():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=7)[:, :5]
    combined = combine_boundary_classes(np.log(probs), (0, 1, 4))
    np.testing.assert_allclose(np.exp(combined), probs[:, [0, 1, 4]].sum(1), rtol=1e-12)
    assert np.all(combine_boundary_classes(np.full((2, 5), -np.inf)) == -np.inf)


def random_document(rng: np.random.Generator):
    """Two tokenizations of a random document with blocks, for the targets comparison."""
    teacher, teacher_roles, student, student_roles = [], [], [], []
    for segment in range(rng.integers(1, 6)):
        if segment == 0 or rng.random() < 0.3:
            for tokens, roles in ((teacher, teacher_roles), (student, student_roles)):
                role = ["bos", "eot", "header:user"][rng.integers(0, 3)] if segment else "bos"
                tokens += [b""] * int(rng.integers(1, 3))
                roles += [role] * (len(tokens) - len(roles))
            continue
        text = bytes(rng.integers(97, 100, size=int(rng.integers(1, 20))).tolist())
        for tokens, roles, mean in ((teacher, teacher_roles, 3), (student, student_roles, 1.5)):
            pos = 0
            while pos < len(text):
                step = int(rng.integers(1, 2 * mean + 1))
                tokens.append(text[pos : pos + step])
                roles.append(None)
                pos += step
    return teacher, teacher_roles, student, student_roles


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.booleans(), st.booleans()
)
def test_targets_match_the_reference_loop(seed, gamma, drop, use_spans):
    rng = np.random.default_rng(seed)
    teacher, teacher_roles, student, student_roles = random_document(rng)
    total = sum(len(t) for t, r in zip(teacher, teacher_roles) if r is None)
    spans = [(int(rng.integers(0, total + 1)), total)] if use_spans else None
    chunks = align_chunks(
        teacher, student, teacher_roles=teacher_roles, student_roles=student_roles, loss_spans=spans
    )
    logp = np.concatenate([[np.nan], -rng.exponential(2.0, size=len(teacher) - 1)])
    boundary = np.log(rng.uniform(0.0, 0.3, size=len(teacher)))
    targets = build_alm_targets(chunks, logp, boundary, gamma=gamma, drop_unterminated_groups=drop)
    ref_chunks = reference_align(teacher, student, teacher_roles, student_roles, spans)
    expected = reference_groups(ref_chunks, logp.tolist(), boundary.tolist(), gamma, drop)
    np.testing.assert_allclose(
        targets.teacher_group_logp, [g.teacher_logp for g in expected], rtol=1e-6
    )
    assert targets.teacher_group_start.tolist() == [g.teacher_start for g in expected]
    assert targets.teacher_group_end.tolist() == [g.teacher_end for g in expected]
    assert targets.student_group_start.tolist() == [g.student_start for g in expected]
    assert targets.student_group_end.tolist() == [g.student_end for g in expected]
    assert (targets.student_group_last_pos == targets.student_group_end - 1).all()


def test_prefix_sums_equal_direct_sums_over_long_sequences():
    rng = np.random.default_rng(1)
    n = 5000
    tokens = [b"x"] * n
    chunks = align_chunks(tokens, tokens)
    logp = np.concatenate([[np.nan], -rng.exponential(3.0, size=n - 1)]).astype(np.float32)
    targets = build_alm_targets(chunks, logp, np.zeros(n), gamma=0.0)
    np.testing.assert_array_equal(targets.teacher_group_logp, logp[1:])


def test_groups_never_span_a_gap_in_the_loss_region():
    chunks = [RefChunk(1, 2, 1, 2, 0, 1, False), RefChunk(3, 4, 3, 4, 2, 3, False)]
    groups = reference_groups(
        chunks, [0, -1, -1, -1], [-9, -9, -9, -9], gamma=0.5, drop_unterminated=False
    )
    assert len(groups) == 2
    teacher = [b"a", b"b", b"c", b"d"]
    real = align_chunks(teacher, teacher, loss_spans=[(0, 2), (3, 4)])
    targets = build_alm_targets(
        real,
        np.array([0, -1, -1, -1.0]),
        np.full(4, -9.0),
        gamma=0.5,
        drop_unterminated_groups=False,
    )
    assert targets.student_group_start.tolist() == [1, 3]
    assert targets.student_group_end.tolist() == [2, 4]


def test_hidden_state_positions_cover_chunks_outside_the_loss_region_and_groups_do_not():
    teacher = [b"", b"ab", b"c", b"de"]
    student = [b"", b"a", b"bc", b"d", b"e"]
    roles_t, roles_s = ["bos", None, None, None], ["bos", None, None, None, None]
    chunks = align_chunks(
        teacher, student, teacher_roles=roles_t, student_roles=roles_s, loss_spans=[(3, 5)]
    )
    assert chunks.end_byte.tolist() == [5]
    from alm.align import align_sequences
    from alm.align.chunks import _offsets

    teacher_seq, _ = _offsets(teacher, roles_t, "teacher")
    student_seq, _ = _offsets(student, roles_s, "student")
    every = align_sequences(teacher_seq, student_seq, [(3, 5)], keep_outside_loss=True)
    assert every.in_loss.tolist() == [False, True]
    targets = build_alm_targets(every, np.array([np.nan, -1.0, -1.0, -1.0]), np.zeros(4), gamma=0.1)
    assert targets.student_group_start.tolist() == [3] and targets.student_group_end.tolist() == [5]
    assert targets.teacher_chunk_last_pos.tolist() == [2, 3]
    assert targets.student_chunk_last_pos.tolist() == [2, 4]
