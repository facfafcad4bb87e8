"""vLLM outputs -> store arrays (`alm.teacher.vllm_convert`), tested on stand-ins with vLLM 0.33's shapes.

vLLM cannot be installed on CPU machines, so its outputs are built here. The stand-in classes copy the *shape* of
vLLM's own (`vllm/logprobs.py`: `Logprob`, `FlatLogprobs`; `vllm/outputs.py`: `CompletionOutput`, `RequestOutput`),
and `vllm_entry` follows `append_logprobs_for_next_position` and the sampler's gather
(`vllm/v1/worker/gpu/sample/logprob.py`): the scored token first, then `torch.topk`'s k ids; the scored token's
rank counts the ids whose logprob is >= its own, the top-k ranks are 1..k. Realistic values come from a tiny real
Llama's logits, so they can be compared with the HF backend's own scoring of the same model.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alm.errors import BackendUnavailableError
from alm.teacher.vllm_convert import (
    boundary_logmass_from_token_scores,
    boundary_logmass_from_topk,
    boundary_token_ids,
    logprob_arrays,
    logprob_arrays_from_request_output,
    scores_from_prenorm_hidden,
    teacher_scores_from_request_output,
)
from tests.tolerance import assert_fp32_close


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, lp in (position or {}).items():
            self.token_ids.append(token_id)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(lp.decoded_token)
        self.end_indices.append(len(self.logprobs))

    def append_fast(self, token_ids, logprobs, ranks, decoded_tokens) -> None:
        self.start_indices.append(len(self.logprobs))
        for t, lp, r, d in zip(token_ids, logprobs, ranks, decoded_tokens):
            self.token_ids.append(t)
            self.logprobs.append(lp)
            self.ranks.append(r)
            self.decoded_tokens.append(d)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index: int) -> dict[int, Logprob]:
        return {
            self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i], self.decoded_tokens[i])
            for i in range(self.start_indices[index], self.end_indices[index])
        }

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_token_id_logprobs: Any = None


def vllm_entry(
    logp_row: np.ndarray, scored_id: int, k: int
) -> tuple[list[int], list[float], list[int]]:
    """(ids, logprobs, ranks) of one position as the sampler emits it: scored token first, then the top-k."""
    row = torch.as_tensor(np.asarray(logp_row, np.float32))
    top = torch.topk(row, k).indices.tolist() if k else []
    rank = int((row >= row[scored_id]).sum())
    ids = [int(scored_id), *top]
    return ids, [float(row[i]) for i in ids], [rank, *range(1, k + 1)]


def container(entries: list[tuple[list[int], list[float], list[int]] | None], layout: str) -> Any:
    """Positions -> `FlatLogprobs` ("flat"), the current dict layout ("dict": scored token first, duplicates
    merged by the dict, the top-k entry's Logprob wins), or the older dict layout ("dict_old": top-k first, the
    scored token injected last with rank k + 1 only when it is not in the top-k)."""
    if layout == "flat":
        out = FlatLogprobs()
        for entry in entries:
            if entry is None:
                out.append(None)
            else:
                ids, lps, ranks = entry
                out.append_fast(ids, lps, itertools.chain(ranks), [None] * len(ids))
        return out
    result: list[dict[int, Logprob] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        ids, lps, ranks = entry
        if layout == "dict":
            result.append({t: Logprob(lp, r) for t, lp, r in zip(ids, lps, ranks)})
        else:
            k = len(ids) - 1
            pos = {t: Logprob(lp, r) for t, lp, r in zip(ids[1:], lps[1:], ranks[1:])}
            if ids[0] not in pos:
                pos[ids[0]] = Logprob(lps[0], k + 1)
            result.append(pos)
    return result


def request_output_from_logp(
    logp_rows: np.ndarray,
    prompt_ids: list[int],
    k: int,
    layout: str,
    *,
    candidate_ids: np.ndarray | None = None,
    sample_logprobs: bool = True,
) -> RequestOutput:
    """A `RequestOutput` of a teacher-forcing request over `prompt_ids` from full log-prob rows.

    Args:
        logp_rows: float32 [m, V]; row j is the distribution after prompt_ids[:j + 1].
        prompt_ids: the m prompt ids.
        k: prompt_logprobs = logprobs = k.
        layout: "flat", "dict" or "dict_old".
        candidate_ids: fixed ids scored at rows 0..m-2 (`prompt_token_id_logprobs`), if any: int [K] (the same for
            every row) or [m - 1, K] as vLLM 0.33.0 takes them, -1 padding a row (scores -inf,
            `vllm/v1/worker/gpu/sample/prompt_logprob.py:115`).
        sample_logprobs: the request asked for `logprobs` (else the completion's `logprobs` is None).
    """
    m = len(prompt_ids)
    prompt_entries = [None] + [vllm_entry(logp_rows[j - 1], prompt_ids[j], k) for j in range(1, m)]
    sampled = int(np.argmax(logp_rows[m - 1]))  # greedy (temperature 0)
    sample_entries = [vllm_entry(logp_rows[m - 1], sampled, k)]
    token_scores = None
    if candidate_ids is not None:
        ids = np.asarray(candidate_ids, np.int64)
        if ids.ndim == 1:
            ids = np.broadcast_to(ids, (m - 1, ids.shape[0]))
        assert ids.shape[0] == m - 1, "one row of candidate ids per scored prompt row"
        token_scores = np.take_along_axis(
            np.asarray(logp_rows[: m - 1], np.float32), np.maximum(ids, 0), axis=1
        )
        token_scores[ids < 0] = -np.inf
    return RequestOutput(
        request_id="0",
        prompt=None,
        prompt_token_ids=list(prompt_ids),
        prompt_logprobs=container(prompt_entries, layout),
        outputs=[
            CompletionOutput(
                0,
                "",
                [sampled],
                None,
                container(sample_entries, layout) if sample_logprobs else None,
            )
        ],
        prompt_token_id_logprobs=token_scores,
    )


# --------------------------------------------------------------------------------------------------------------
# hand-checked cases
# --------------------------------------------------------------------------------------------------------------

# ids 0..5: 0 none, 1 and 2 space-initial, 3 newline-initial, 4 special, 5 none
HAND_CLASSES = np.array([-1, 0, 0, 1, 4, -1], np.int8)
HAND_PROMPT = [5, 1, 3]
HAND_K = 2
# entry 1 predicts token 1 (inside the top-2), entry 2 predicts token 3 (outside), sample after token 3 is 0.
HAND_ENTRIES = [
    None,
    ([1, 1, 0], [-0.5, -0.5, -1.5], [1, 1, 2]),
    ([3, 2, 4], [-3.0, -0.25, -2.0], [3, 1, 2]),
]
HAND_SAMPLE = [([0, 0, 1], [-0.1, -0.1, -2.5], [1, 1, 2])]
HAND_LOGP = [np.nan, -0.5, -3.0]
HAND_TOPK_ID = [[1, 0], [2, 4], [0, 1]]
HAND_TOPK_LOGP = [[-0.5, -1.5], [-0.25, -2.0], [-0.1, -2.5]]


def _hand_output(layout: str) -> RequestOutput:
    return RequestOutput(
        request_id="hand",
        prompt=None,
        prompt_token_ids=HAND_PROMPT,
        prompt_logprobs=container(HAND_ENTRIES, layout),
        outputs=[CompletionOutput(0, "", [0], None, container(HAND_SAMPLE, layout))],
    )


@pytest.mark.parametrize("layout", ["flat", "dict", "dict_old"])
def test_logp_and_topk_match_hand_checked_arrays_in_every_layout(layout):
    arrays = logprob_arrays_from_request_output(_hand_output(layout), HAND_K)
    np.testing.assert_array_equal(arrays.logp, np.array(HAND_LOGP, np.float32))
    np.testing.assert_array_equal(arrays.topk_id, np.array(HAND_TOPK_ID, np.int32))
    np.testing.assert_array_equal(arrays.topk_logp, np.array(HAND_TOPK_LOGP, np.float32))
    assert arrays.logp.dtype == np.float32 and arrays.topk_id.dtype == np.int32


def test_flat_first_position_is_empty_and_dict_first_position_is_none():
    flat = container(HAND_ENTRIES, "flat")
    assert flat[0] == {} and len(flat) == 3
    assert container(HAND_ENTRIES, "dict")[0] is None
    # the actual token repeated inside the top-k: flat keeps both items, the dict one
    assert flat.end_indices[1] - flat.start_indices[1] == 3
    assert len(container(HAND_ENTRIES, "dict")[1]) == 2


def test_topk_lower_bound_matches_hand_computation():
    blm = boundary_logmass_from_topk(
        np.array(HAND_TOPK_ID), np.array(HAND_TOPK_LOGP), HAND_CLASSES, "lower"
    )
    inf = -np.inf
    expected = np.array(
        [
            [-0.5, inf, inf, inf, inf],  # top-2 {1: space, 0: none}
            [-0.25, inf, inf, inf, -2.0],  # {2: space, 4: special}
            [-2.5, inf, inf, inf, inf],  # {0: none, 1: space}
        ],
        np.float32,
    )
    np.testing.assert_allclose(blm, expected, rtol=1e-6)


def test_topk_upper_bound_adds_the_mass_outside_the_topk_once_to_the_space_class():
    blm = boundary_logmass_from_topk(
        np.array(HAND_TOPK_ID), np.array(HAND_TOPK_LOGP), HAND_CLASSES, "upper"
    )
    e = math.exp
    missing = [1 - e(-0.5) - e(-1.5), 1 - e(-0.25) - e(-2.0), 1 - e(-0.1) - e(-2.5)]
    inf = -np.inf
    expected = np.array(
        [
            [math.log(e(-0.5) + missing[0]), inf, inf, inf, inf],
            [math.log(e(-0.25) + missing[1]), inf, inf, inf, -2.0],
            [math.log(e(-2.5) + missing[2]), inf, inf, inf, inf],
        ]
    )
    np.testing.assert_allclose(blm, expected.astype(np.float32), rtol=1e-5)


def test_fixed_token_id_scores_give_class_logsumexp():
    candidate_ids = np.array([1, 2, 3, 4])
    with np.errstate(divide="ignore"):
        scores = np.log(
            np.array(
                [[0.1, 0.2, 0.3, 0.05], [0.4, 0.0, 0.1, 0.2], [0.25, 0.25, 0.0, 0.0]], np.float64
            )
        ).astype(np.float32)
        expected = np.log(
            np.array(
                [
                    [0.3, 0.3, 0.0, 0.0, 0.05],
                    [0.4, 0.1, 0.0, 0.0, 0.2],
                    [0.5, 0.0, 0.0, 0.0, 0.0],
                ]
            )
        ).astype(np.float32)
    blm = boundary_logmass_from_token_scores(scores, candidate_ids, HAND_CLASSES, 3)
    np.testing.assert_allclose(blm, expected, rtol=1e-6)
    assert blm.dtype == np.float32


def test_fixed_token_id_scores_without_the_dummy_row_are_refused():
    scores = np.zeros((2, 4), np.float32)  # rows for 2 positions, 3 tokens
    with pytest.raises(BackendUnavailableError, match="dummy token"):
        boundary_logmass_from_token_scores(scores, np.array([1, 2, 3, 4]), HAND_CLASSES, 3)


def test_boundary_token_ids_are_every_token_in_a_class():
    np.testing.assert_array_equal(boundary_token_ids(HAND_CLASSES), [1, 2, 3, 4])


# ties: ids 1 and 2 share logprob -1.2; topk(k=2) keeps 0 and one of them.
TIE_ROW = np.log(np.array([0.4, 0.3012, 0.3012, 0.0, 0.0, 0.0]) + 1e-9).astype(np.float32)
TIE_ROW[1] = TIE_ROW[2] = np.float32(-1.2)


@pytest.mark.parametrize("layout", ["flat", "dict", "dict_old"])
def test_tied_actual_token_left_out_of_the_topk_keeps_its_logp_and_the_topk(layout):
    kept = torch.topk(torch.as_tensor(TIE_ROW), 2).indices.tolist()
    left_out = ({1, 2} - set(kept)).pop()
    entry = vllm_entry(TIE_ROW, left_out, 2)
    # rank of the tied token counts ids >= its logprob: within k + 1 although it is not in the top-k
    assert entry[2][0] == 3
    if layout == "dict":
        # current dict layout: 3 items, the scored one first with rank 3 <= k + 1
        assert len(container([entry], "dict")[0]) == 3
    prompt = [0, left_out]
    rows = [None, entry]
    out = logprob_arrays(
        container(rows, layout),
        prompt,
        2,
        sample_logprobs=container([vllm_entry(TIE_ROW, 0, 2)], layout),
        sampled_token_id=0,
    )
    assert out.logp[1] == np.float32(-1.2)
    assert sorted(out.topk_id[0].tolist()) == sorted(kept)
    assert out.topk_logp[0, 0] >= out.topk_logp[0, 1]


@pytest.mark.parametrize("layout", ["flat", "dict", "dict_old"])
def test_tied_actual_token_inside_the_topk_is_not_dropped(layout):
    kept = torch.topk(torch.as_tensor(TIE_ROW), 2).indices.tolist()
    inside = ({1, 2} & set(kept)).pop()
    out = logprob_arrays(
        container([None, vllm_entry(TIE_ROW, inside, 2)], layout),
        [0, inside],
        2,
        sample_logprobs=container([vllm_entry(TIE_ROW, 0, 2)], layout),
        sampled_token_id=0,
    )
    assert sorted(out.topk_id[0].tolist()) == sorted(kept)
    assert out.logp[1] == np.float32(-1.2)


@pytest.mark.parametrize(
    ("layout", "ids"), [("flat", [2, 1, 0]), ("flat", [2, 4, 0]), ("dict", [2, 4, 0])]
)
def test_a_missing_or_misplaced_scored_token_is_reported_as_a_layout_problem(layout, ids):
    bad = container([None, (ids, [-1.0, -0.5, -1.5], [2, 1, 3])], layout)
    with pytest.raises(BackendUnavailableError, match="scored token id"):
        logprob_arrays(bad, [5, 1], 2, num_tokens=1)


def test_an_entry_of_the_wrong_width_is_reported():
    bad = container([None, ([1, 1, 0, 3], [-0.5, -0.5, -1.5, -2.0], [1, 1, 2, 3])], "flat")
    with pytest.raises(BackendUnavailableError, match="expected 2 or 3"):
        logprob_arrays(bad, [5, 1], 2, num_tokens=1)


def test_too_few_prompt_entries_name_the_prefix_cache():
    with pytest.raises(BackendUnavailableError, match="prefix"):
        logprob_arrays(container([None], "flat"), [5, 1], 2)


def test_the_last_topk_row_needs_the_sampled_logprobs_or_a_dummy_token():
    with pytest.raises(ValueError, match="dummy"):
        logprob_arrays(container(HAND_ENTRIES, "flat"), HAND_PROMPT, HAND_K)


def test_k_zero_gives_logp_only():
    entries = [None, ([1], [-0.5], [1]), ([3], [-3.0], [3])]
    out = logprob_arrays(container(entries, "flat"), HAND_PROMPT, 0)
    np.testing.assert_array_equal(out.logp, np.array(HAND_LOGP, np.float32))
    assert out.topk_id is None and out.topk_logp is None


# --------------------------------------------------------------------------------------------------------------
# realistic outputs from a tiny real model
# --------------------------------------------------------------------------------------------------------------

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    from factories import tiny_llama

    return tiny_llama(VOCAB, seed=3)


@pytest.fixture(scope="module")
def boundary_class():
    rng = np.random.default_rng(0)
    classes = rng.choice(np.array([-1, -1, -1, 0, 0, 1, 2, 3], np.int8), size=VOCAB)
    classes[:3] = 4  # three specials
    return classes


def _sequences(seed: int = 0, count: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(2, 14))).tolist() for _ in range(count)]


def _logp_rows(model, ids: list[int]) -> np.ndarray:
    """Full fp32 log-softmax rows as vLLM's kernel computes them: logits - max - log Σ exp(logits - max)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [m, V]
    peak = logits.amax(dim=-1, keepdim=True)
    return (logits - peak - (logits - peak).exp().sum(-1, keepdim=True).log()).numpy()


def _class_masks(boundary_class):
    from alm.teacher.base import boundary_class_masks

    return boundary_class_masks(boundary_class, VOCAB)


def _exact(model, ids, boundary_class, top_k):
    from alm.teacher.scoring import scores_from_logits

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return scores_from_logits(logits, np.array(ids), _class_masks(boundary_class), top_k=top_k)


@pytest.mark.parametrize("layout", ["flat", "dict", "dict_old"])
def test_arrays_from_model_outputs_equal_the_hf_scoring(model, boundary_class, layout):
    k = 6
    for ids in _sequences():
        out = request_output_from_logp(_logp_rows(model, ids), ids, k, layout)
        arrays = logprob_arrays_from_request_output(out, k)
        exact = _exact(model, ids, boundary_class, k)
        assert_fp32_close(arrays.logp, exact.logp, equal_nan=True)
        assert np.isnan(arrays.logp[0])
        np.testing.assert_array_equal(arrays.topk_id, exact.topk_id)
        assert_fp32_close(arrays.topk_logp, exact.topk_logp)


def test_a_dummy_last_token_gives_the_same_arrays_as_the_sampled_token(model):
    k = 5
    for ids in _sequences(seed=1):
        with_dummy = [*ids, 0]
        rows = _logp_rows(model, with_dummy)
        via_sample = logprob_arrays_from_request_output(
            request_output_from_logp(rows[:-1], ids, k, "flat"), k
        )
        via_dummy = logprob_arrays_from_request_output(
            request_output_from_logp(rows, with_dummy, k, "flat"), k, num_tokens=len(ids)
        )
        np.testing.assert_array_equal(via_dummy.logp, via_sample.logp)
        np.testing.assert_array_equal(via_dummy.topk_id, via_sample.topk_id)
        assert_fp32_close(via_dummy.topk_logp, via_sample.topk_logp)


def test_fixed_token_id_scoring_equals_the_exact_boundary_logmass(model, boundary_class):
    candidate_ids = boundary_token_ids(boundary_class)
    for ids in _sequences(seed=2):
        prompt = [*ids, 0]
        out = request_output_from_logp(
            _logp_rows(model, prompt), prompt, 1, "flat", candidate_ids=candidate_ids
        )
        scores = teacher_scores_from_request_output(
            out,
            boundary_class,
            num_logprobs=1,
            boundary_method="token_ids",
            candidate_ids=candidate_ids,
            dummy_last_token=True,
        )
        exact = _exact(model, ids, boundary_class, 0)
        assert_fp32_close(scores.boundary_logmass, exact.boundary_logmass)
        assert_fp32_close(scores.logp, exact.logp, equal_nan=True)
        assert scores.topk_id is None


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, VOCAB), seed=st.integers(0, 2**16))
def test_topk_bounds_enclose_the_exact_boundary_logmass(model, boundary_class, k, seed):
    ids = _sequences(seed=seed, count=1)[0]
    out = request_output_from_logp(_logp_rows(model, ids), ids, k, "flat")
    arrays = logprob_arrays_from_request_output(out, k)
    exact = _exact(model, ids, boundary_class, 0).boundary_logmass
    lower = boundary_logmass_from_topk(arrays.topk_id, arrays.topk_logp, boundary_class, "lower")
    upper = boundary_logmass_from_topk(arrays.topk_id, arrays.topk_logp, boundary_class, "upper")
    assert np.all(lower <= exact + 1e-5)
    assert np.all(
        exact[:, 0] <= upper[:, 0] + 1e-5
    )  # the space class, and every union containing it:
    total = {
        name: np.logaddexp.reduce(x.astype(np.float64), axis=1)
        for name, x in (("lower", lower), ("exact", exact), ("upper", upper))
    }
    assert np.all(total["lower"] <= total["exact"] + 1e-5)
    assert np.all(total["exact"] <= total["upper"] + 1e-5)
    assert np.all(np.exp(total["upper"]) <= 1 + 1e-5)  # the missing mass is counted once
    if k == VOCAB:  # the whole distribution: both bounds are exact
        assert_fp32_close(lower, exact)
        np.testing.assert_allclose(upper, exact, atol=1e-4)


def test_prenorm_hidden_states_with_alms_norm_and_head_equal_the_full_model(model, boundary_class):
    ids = _sequences(seed=4, count=1)[0]
    captured = {}

    def keep_input(_module, args, _output):
        captured["prenorm"] = args[0][0].detach().clone()  # [m, d], the last layer before the norm

    hook = model.model.norm.register_forward_hook(keep_input)
    try:
        exact = _exact(model, ids, boundary_class, 4)
    finally:
        hook.remove()
    scores = scores_from_prenorm_hidden(
        captured["prenorm"].numpy(),
        model.model.norm,
        model.lm_head,
        np.array(ids),
        _class_masks(boundary_class),
        top_k=4,
    )
    assert_fp32_close(scores.logp, exact.logp, equal_nan=True)
    assert_fp32_close(scores.boundary_logmass, exact.boundary_logmass)
    np.testing.assert_array_equal(scores.topk_id, exact.topk_id)


def test_teacher_scores_keep_only_the_stored_topk(model, boundary_class):
    ids = _sequences(seed=5, count=1)[0]
    out = request_output_from_logp(_logp_rows(model, ids), ids, 8, "flat")
    scores = teacher_scores_from_request_output(
        out, boundary_class, num_logprobs=8, boundary_method="topk_lower", store_top_k=3
    )
    assert scores.topk_id.shape == (len(ids), 3) and scores.topk_logp.shape == (len(ids), 3)
    assert scores.boundary_logmass.shape == (len(ids), 5)


# --------------------------------------------------------------------------------------------------------------
# the adapter, as far as it runs without vLLM
# --------------------------------------------------------------------------------------------------------------

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(VLLM_INSTALLED, reason="checks the message shown where vLLM is missing")
def test_vllm_backend_without_vllm_names_the_install_command(boundary_class):
    from alm.teacher.vllm import VLLMTeacher

    with pytest.raises(BackendUnavailableError, match=r"pip install 'alm\[vllm\]'"):
        VLLMTeacher("unused", boundary_class, boundary_method="topk_lower")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boundary_method": "exactish"}, "boundary_method"),
        ({"top_k": 30, "num_logprobs": 20}, "num_logprobs >= 30"),
        ({"boundary_method": "topk_upper", "num_logprobs": 0}, "num_logprobs >= 1"),
        ({"hidden_states": True}, "teacher.backend: hf"),
    ],
)
def test_vllm_backend_refuses_contradictory_settings_before_loading(
    boundary_class, kwargs, message
):
    from alm.errors import ConfigError
    from alm.teacher.vllm import VLLMTeacher

    with pytest.raises(ConfigError, match=message):
        VLLMTeacher("unused", boundary_class, **kwargs)


def test_token_scores_stay_float32_and_row_chunks_change_only_the_rounding(model, boundary_class):
    candidate_ids = boundary_token_ids(boundary_class)
    ids = _sequences(seed=6, count=1)[0] * 3
    prompt = [*ids, 0]
    rows = _logp_rows(model, prompt)[:-1][:, candidate_ids].astype(np.float32)  # [n, K]
    whole = boundary_logmass_from_token_scores(rows, candidate_ids, boundary_class, len(ids))
    # numpy may vectorise a sum differently per chunk shape: ulps only
    for chunk in (1, 7, len(ids)):
        assert_fp32_close(
            boundary_logmass_from_token_scores(
                rows, candidate_ids, boundary_class, len(ids), row_chunk=chunk
            ),
            whole,
        )
    assert whole.dtype == np.float32
    # against a float64 reference written from the definition: log Σ_{v in class c} p_v
    cls = boundary_class[candidate_ids]
    with np.errstate(divide="ignore"):
        reference = np.stack(
            [np.log(np.exp(rows[:, cls == c].astype(np.float64)).sum(axis=1)) for c in range(5)], 1
        )
    assert_fp32_close(whole, reference.astype(np.float32))
