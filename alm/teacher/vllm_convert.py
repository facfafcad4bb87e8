"""vLLM outputs -> teacher-store arrays, as plain functions (ALM_SPEC.md §10.2, §10.3; DESIGN.md "Stage one").

This module owns every conversion from what vLLM returns to the arrays of the teacher store, so that all of it is
tested on CPU machines where vLLM cannot be installed. It never imports vLLM: the inputs are read by duck typing
(the attributes below), so vLLM's own objects and small stand-ins with the same attributes both work. It imports
numpy, and torch only inside `scores_from_prenorm_hidden`.

What vLLM returns (read from the vLLM 0.33.0 wheel's sources, `vllm/logprobs.py`, `vllm/outputs.py`,
`vllm/v1/engine/logprobs.py`, `vllm/v1/worker/gpu/sample/{logprob,prompt_logprob}.py`; see docs/vllm-fidelity.md):

- `RequestOutput.prompt_logprobs`: one entry per prompt token. Entry 0 is `None` (list layout) or an empty range
  (`FlatLogprobs`, whose `[0]` is `{}`); entry j >= 1 scores the distribution that predicts prompt token j. Each
  entry holds the actual token first, then the top-k in rank order (`torch.topk` order, ranks 1..k).
  - `FlatLogprobs` (`SamplingParams(flat_logprobs=True)`): lists `start_indices`, `end_indices` (one per
    position), and flat `token_ids`, `logprobs`, `ranks`, `decoded_tokens`. The actual token is *always* first in
    its range and is repeated in the top-k when it is in it, so every scored range has k + 1 items.
  - list layout: `list[dict[int, Logprob] | None]`, `Logprob(logprob, rank, decoded_token)`. A dict cannot hold a
    key twice, so it has k items when the actual token is in the top-k and k + 1 when it is not. Older releases put
    the injected actual token last with rank k + 1; newer ones put it first with its vocabulary rank, which under
    ties can be <= k. So ranks are never used here to decide membership: the actual token is dropped from the
    top-k only when the entry has k + 1 items.
- `RequestOutput.outputs[0].logprobs[0]`: the same kind of entry for the one sampled token (greedy, so it is the
  argmax), i.e. the distribution *after the last prompt token*, which `prompt_logprobs` never contains.
- `RequestOutput.prompt_token_id_logprobs` (`SamplingParams(prompt_logprob_token_ids=ids, prompt_logprob_start=s)`
  with `ids` an integer `[prompt_len - 1 - s, K]` array, one row of candidate ids per scored prompt row, V2 model
  runner, `K <= max_logprobs`): a float32 numpy `[prompt_len - 1 - s, K]` matrix; row i scores prompt token
  `s + i + 1` over its row's ids (−inf at −1 padding); the final prompt row is not returned. With
  `logprobs_mode="raw_logprobs"` these are log-probabilities of the raw logits.

Store conventions (docs/architecture.md): position q of a sequence of n tokens has `logp[q] = log p(token_q |
tokens[:q])` (NaN at q = 0), `boundary_logmass[q, c]` and `topk_*[q]` describe the distribution after
tokens[:q + 1], which exists at q = n - 1 too.

Boundary log-mass methods (recorded in the manifest as `boundary_method`):

- `exact` (HF backend: full logits), `token_ids` (vLLM fixed token-id scoring over every token of a boundary class;
  exact up to vLLM's kernels), `hidden` (final-norm + LM head applied by alm to hidden states; exact),
- `topk_lower` / `topk_upper`: the top-k bound of §10.2 option 3. Lower: log Σ over top-k ∩ class, per class.
  Upper: the mass outside the top-k is added once, to the space class, so that any union of classes that contains
  the space class (the default boundary set, what ALM's merging and debiasing read) gets an upper bound, counting
  the missing mass once; the other classes alone keep their lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from alm.errors import BackendUnavailableError
from alm.teacher.base import NUM_BOUNDARY_CLASSES, TeacherScores

BoundaryMethod = Literal["exact", "token_ids", "hidden", "topk_lower", "topk_upper"]
TopkBound = Literal["lower", "upper"]

_LAYOUT_HINT = (
    "alm reads the layout of vLLM 0.33 (see alm/teacher/vllm_convert.py); install vllm==0.33.* "
    "(pip install 'alm[vllm]') or use `teacher.backend: hf`"
)


@dataclass(frozen=True)
class LogprobArrays:
    """Per-position arrays of one sequence read from vLLM's prompt/sample logprobs.

    Attributes:
        logp: float32 [n], log p(token_q | tokens[:q]); NaN at q = 0.
        topk_id: int32 [n, k] ids of the top-k of the distribution after tokens[:q + 1] (descending logp);
            None when k = 0.
        topk_logp: float32 [n, k], their log-probabilities; None when k = 0.
    """

    logp: np.ndarray
    topk_id: np.ndarray | None
    topk_logp: np.ndarray | None


def _is_flat(container: Any) -> bool:
    return all(
        hasattr(container, a) for a in ("start_indices", "end_indices", "token_ids", "logprobs")
    )


def _entry_arrays(entry: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [m], logp float64 [m]) of one list-layout entry (`dict[int, Logprob]`, `{}` or None)."""
    if not entry:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    ids = np.fromiter((int(t) for t in entry), np.int64, len(entry))
    logp = np.fromiter((float(v.logprob) for v in entry.values()), np.float64, len(entry))
    return ids, logp


def _split_entry(
    ids: np.ndarray, logp: np.ndarray, actual_id: int, k: int, where: str, flat: bool = False
) -> tuple[float, np.ndarray, np.ndarray]:
    """Split one position's items (container order) into the actual token's logp and the top-k (descending).

    Works for both layouts: a position has k + 1 items (actual token not in the top-k, or flat layout with
    the actual token repeated) or k items (dict layout, actual token inside the top-k).
    """
    hits = np.flatnonzero(ids == actual_id)
    if hits.size == 0 or (flat and hits[0] != 0):
        raise BackendUnavailableError(
            f"vLLM logprobs at {where} do not start with (FlatLogprobs) or contain the scored token id "
            f"{actual_id} "
            f"(got ids {ids[:8].tolist()}...); {_LAYOUT_HINT}"
        )
    actual_logp = float(logp[hits[0]])
    if ids.size == k + 1:
        keep = np.ones(ids.size, bool)
        keep[hits[0]] = False  # the actual token's own slot; a repeat inside the top-k stays
        top_ids, top_logp = ids[keep], logp[keep]
    elif ids.size == k:
        top_ids, top_logp = ids, logp
    else:
        raise BackendUnavailableError(
            f"vLLM logprobs at {where} have {ids.size} entries, expected {k} or {k + 1} for "
            f"prompt_logprobs/logprobs={k}; set both to the recipe's top-k; {_LAYOUT_HINT}"
        )
    order = np.argsort(-top_logp, kind="stable")
    return actual_logp, top_ids[order], top_logp[order]


def _positions(
    container: Any, k: int, actual_ids: Sequence[int] | np.ndarray, first: int, where: str
):
    """Yield (actual_logp, top_ids, top_logp) for positions first..len(actual_ids)-1 of a logprobs container."""
    if _is_flat(container):
        starts = np.asarray(container.start_indices, np.int64)
        ends = np.asarray(container.end_indices, np.int64)
        flat_ids = np.asarray(container.token_ids, np.int64)
        flat_logp = np.asarray(container.logprobs, np.float64)
        for j in range(first, len(actual_ids)):
            s, e = starts[j], ends[j]
            yield _split_entry(
                flat_ids[s:e], flat_logp[s:e], int(actual_ids[j]), k, f"{where} {j}", flat=True
            )
    else:
        for j in range(first, len(actual_ids)):
            ids, logp = _entry_arrays(container[j])
            yield _split_entry(ids, logp, int(actual_ids[j]), k, f"{where} {j}")


def _flat_fast_path(
    container: Any, token_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Vectorised read of a `FlatLogprobs` whose scored positions all have k + 1 items, actual token first."""
    m = token_ids.size
    starts = np.asarray(container.start_indices, np.int64)
    ends = np.asarray(container.end_indices, np.int64)
    if starts.size != m or m < 2 or starts[0] != ends[0]:
        return None
    width = k + 1
    if not (np.all(ends[1:] - starts[1:] == width) and np.all(starts[2:] == ends[1:-1])):
        return None
    lo, hi = int(starts[1]), int(ends[-1])
    ids = np.asarray(container.token_ids[lo:hi], np.int64).reshape(m - 1, width)
    logp = np.asarray(container.logprobs[lo:hi], np.float64).reshape(m - 1, width)
    if not np.array_equal(ids[:, 0], token_ids[1:]):
        return None
    top_ids, top_logp = ids[:, 1:], logp[:, 1:]
    order = np.argsort(-top_logp, axis=1, kind="stable")
    return (
        logp[:, 0],
        np.take_along_axis(top_ids, order, axis=1),
        np.take_along_axis(top_logp, order, axis=1),
    )


def logprob_arrays(
    prompt_logprobs: Any,
    prompt_token_ids: Sequence[int] | np.ndarray,
    num_logprobs: int,
    *,
    num_tokens: int | None = None,
    sample_logprobs: Any = None,
    sampled_token_id: int | None = None,
) -> LogprobArrays:
    """Read `logp` and the top-k arrays of one sequence from vLLM's prompt (and sampled-token) logprobs.

    Args:
        prompt_logprobs: `RequestOutput.prompt_logprobs`, `FlatLogprobs` or `list[dict[int, Logprob] | None]`,
            one entry per prompt token (entry 0 empty).
        prompt_token_ids: int [m], the ids given to vLLM in `TokensPrompt(prompt_token_ids=...)`.
        num_logprobs: k, the `prompt_logprobs`/`logprobs` value of the request (0: no top-k arrays).
        num_tokens: n, how many of the prompt tokens belong to the sequence (default m). With n = m - 1 the last
            prompt token is a dummy whose entry gives the top-k after the last real token; with n = m that
            distribution comes from `sample_logprobs`.
        sample_logprobs: `RequestOutput.outputs[0].logprobs` (its first entry is used), needed when n = m and k > 0.
        sampled_token_id: `RequestOutput.outputs[0].token_ids[0]`, the token that entry was sampled for.

    Returns:
        `LogprobArrays` with n positions.

    Raises:
        BackendUnavailableError: the containers do not have the vLLM 0.33 shape (wrong size, scored token missing).
    """
    token_ids = np.asarray(prompt_token_ids, np.int64)
    m = token_ids.size
    n = m if num_tokens is None else num_tokens
    if not (m - 1 <= n <= m) or n < 1:
        raise ValueError(f"num_tokens={n} must be len(prompt_token_ids) ({m}) or one less")
    if len(prompt_logprobs) != m:
        raise BackendUnavailableError(
            f"vLLM returned {len(prompt_logprobs)} prompt_logprobs entries for {m} prompt tokens "
            f"(a prefix-cache hit skips prompt rows: keep enable_prefix_caching off); {_LAYOUT_HINT}"
        )
    logp = np.full(n, np.nan, np.float32)
    k = num_logprobs
    # entry j (1 <= j < m) predicts token j and holds the top-k after tokens[:j], i.e. store position j - 1
    fast = (
        _flat_fast_path(prompt_logprobs, token_ids, k)
        if _is_flat(prompt_logprobs) and m >= 2
        else None
    )
    if fast is None:
        rows = list(_positions(prompt_logprobs, k, token_ids, 1, "prompt position"))
        actual = np.array([r[0] for r in rows], np.float64)
        top_ids = np.array([r[1] for r in rows], np.int64).reshape(m - 1, k)
        top_logp = np.array([r[2] for r in rows], np.float64).reshape(m - 1, k)
    else:
        actual, top_ids, top_logp = fast
    logp[1:n] = actual[: n - 1]
    if k == 0:
        return LogprobArrays(logp=logp, topk_id=None, topk_logp=None)
    topk_id = np.zeros((n, k), np.int32)
    topk_logp = np.zeros((n, k), np.float32)
    topk_id[: m - 1] = top_ids  # with a dummy last token (n = m - 1) this fills every position
    topk_logp[: m - 1] = top_logp
    if n == m:
        if sample_logprobs is None or sampled_token_id is None or len(sample_logprobs) < 1:
            raise ValueError(
                "the top-k after the last prompt token needs outputs[0].logprobs and outputs[0].token_ids "
                "(request logprobs=k and max_tokens=1), or a dummy last prompt token (num_tokens = m - 1)"
            )
        (_, last_ids, last_logp) = next(
            _positions(sample_logprobs, k, [sampled_token_id], 0, "sampled position")
        )
        topk_id[n - 1] = last_ids
        topk_logp[n - 1] = last_logp
    return LogprobArrays(logp=logp, topk_id=topk_id, topk_logp=topk_logp)


def logprob_arrays_from_request_output(
    request_output: Any, num_logprobs: int, *, num_tokens: int | None = None
) -> LogprobArrays:
    """`logprob_arrays` applied to a `vllm.RequestOutput` (attributes `prompt_token_ids`, `prompt_logprobs`,
    `outputs[0].token_ids`, `outputs[0].logprobs`)."""
    completion = request_output.outputs[0] if request_output.outputs else None
    return logprob_arrays(
        request_output.prompt_logprobs,
        request_output.prompt_token_ids,
        num_logprobs,
        num_tokens=num_tokens,
        sample_logprobs=None if completion is None else completion.logprobs,
        sampled_token_id=None
        if completion is None or not completion.token_ids
        else int(completion.token_ids[0]),
    )


def _class_of(ids: np.ndarray, boundary_class: np.ndarray) -> np.ndarray:
    """Boundary class of each id; ids beyond the tokenizer's table (padded model rows) are in no class (-1)."""
    table = np.asarray(boundary_class)
    ids = np.asarray(ids, np.int64)
    inside = (ids >= 0) & (ids < table.shape[0])
    return np.where(inside, table[np.clip(ids, 0, table.shape[0] - 1)], -1).astype(np.int16)


def _logsumexp_by_class(logp: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """[rows, K] log-probabilities, [K] class of each column (-1 = none) -> float64 [rows, 5] (−inf if empty)."""
    out = np.full((logp.shape[0], NUM_BOUNDARY_CLASSES), -np.inf, np.float64)
    for c in range(NUM_BOUNDARY_CLASSES):
        cols = logp[:, cls == c] if cls.ndim == 1 else np.where(cls == c, logp, -np.inf)
        if cols.shape[1] == 0:
            continue
        peak = cols.max(axis=1, keepdims=True)
        finite = np.isfinite(peak[:, 0])
        safe_peak = np.where(np.isfinite(peak), peak, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            total = np.log(np.exp(cols - safe_peak).sum(axis=1)) + safe_peak[:, 0]
        out[:, c] = np.where(finite, total, -np.inf)
    return out


def boundary_token_ids(boundary_class: np.ndarray) -> np.ndarray:
    """The candidate ids for fixed token-id scoring: every token in a boundary class, int64 [K] ascending.

    Args:
        boundary_class: int8 [V], `Vocab.boundary_class` (-1 none, 0..4 the classes).
    """
    return np.flatnonzero(np.asarray(boundary_class) >= 0).astype(np.int64)


def boundary_logmass_from_token_scores(
    scores: Any,
    candidate_ids: np.ndarray,
    boundary_class: np.ndarray,
    num_tokens: int,
    row_chunk: int = 256,
) -> np.ndarray:
    """Exact boundary log-mass from vLLM's fixed token-id scoring (`prompt_token_id_logprobs`).

    The request must use `prompt_logprob_start=0` and one dummy token appended to the prompt, so that its
    `num_tokens` rows are the distributions after tokens[:1], ..., tokens[:n] (vLLM never returns the row after
    the final prompt token; the dummy makes the last real token's row a prompt row, and, attention being causal,
    it changes nothing before it).

    Args:
        scores: float32 [rows >= n, K], `RequestOutput.prompt_token_id_logprobs` (a numpy array in vLLM 0.33.0,
            `vllm/outputs.py:184`; a CPU tensor works too), log-probabilities of `candidate_ids`.
        candidate_ids: int [K], the `prompt_logprob_token_ids` of the request.
        boundary_class: int8 [V], `Vocab.boundary_class`.
        num_tokens: n, the number of real tokens of the sequence.
        row_chunk: rows per float32 [row_chunk, K] temporary (memory bound, not results).

    Returns:
        float32 [n, 5], log of each class's probability mass (−inf for a class with no candidate), summed in
        float32 (the scores are float32 already; the HF backend sums its class masses in float32 too).

    Raises:
        BackendUnavailableError: fewer rows than tokens (no dummy token, or a partial prefill).
    """
    # float32 as vLLM returns it (`v1/engine/logprobs.py:366`, `.numpy()` of an fp32 tensor): a float64 copy would
    # double the 4·K bytes per token this matrix already costs on the CPU
    matrix = np.asarray(scores)
    if matrix.ndim != 2 or matrix.shape[0] < num_tokens or matrix.shape[1] != len(candidate_ids):
        raise BackendUnavailableError(
            f"prompt_token_id_logprobs has shape {matrix.shape}, expected at least ({num_tokens}, "
            f"{len(candidate_ids)}): append one dummy token to the prompt and use prompt_logprob_start=0; "
            f"{_LAYOUT_HINT}"
        )
    if matrix.dtype != np.float32:
        matrix = matrix.astype(np.float32)
    cls = _class_of(candidate_ids, boundary_class)
    # columns grouped by class once, so each class is a contiguous slice of the reordered matrix
    order = np.argsort(cls, kind="stable")
    bounds = np.searchsorted(cls[order], np.arange(-1, NUM_BOUNDARY_CLASSES + 1))
    out = np.full((num_tokens, NUM_BOUNDARY_CLASSES), -np.inf, np.float32)
    for r0 in range(0, num_tokens, row_chunk):
        r1 = min(num_tokens, r0 + row_chunk)
        rows = matrix[r0:r1][:, order]  # [R, K] float32, columns by class
        for c in range(NUM_BOUNDARY_CLASSES):
            lo, hi = bounds[c + 1], bounds[c + 2]
            if hi > lo:
                out[r0:r1, c] = _logsumexp_rows_fp32(rows[:, lo:hi])
    return out


def _logsumexp_rows_fp32(logp: np.ndarray) -> np.ndarray:
    """float32 [R, K] log-probabilities -> float32 [R] log Σ exp (−inf for a row of −inf), summed in float32 like
    the HF backend's class masses (`alm.teacher.scoring`)."""
    peak = logp.max(axis=1)  # [R]
    finite = np.isfinite(peak)
    safe_peak = np.where(finite, peak, np.float32(0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        total = np.log(np.exp(logp - safe_peak[:, None]).sum(axis=1, dtype=np.float32)) + safe_peak
    return np.where(finite, total, np.float32(-np.inf)).astype(np.float32)


def boundary_logmass_from_topk(
    topk_id: np.ndarray,
    topk_logp: np.ndarray,
    boundary_class: np.ndarray,
    bound: TopkBound = "lower",
) -> np.ndarray:
    """The top-k bound of the boundary log-mass (ALM_SPEC.md §10.2, option 3).

    lower[q, c] = log Σ_{v ∈ topk[q], class(v) = c} p_v (−inf when no top-k token is in c);
    upper[q, 0] = log(exp(lower[q, 0]) + m[q]) with m[q] = max(0, 1 − Σ_{v ∈ topk[q]} p_v), the mass outside the
    top-k; upper[q, c] = lower[q, c] for c > 0.

    Adding m to every class would make each class's value an upper bound, but a union of classes, formed later with
    logsumexp over the stored classes (ALM's default boundary set is all five), would then count m up to five
    times. Adding it once, to the space class (the largest boundary class in every byte-level vocabulary), keeps
    the union of all classes, and any union containing the space class, an upper bound that counts m once: the
    exact union mass lies between the lower- and the upper-bound store's.

    Args:
        topk_id: int [n, k]; topk_logp: float [n, k] (descending or not; duplicates are not expected).
        boundary_class: int8 [V], `Vocab.boundary_class`.
        bound: "lower" or "upper".

    Returns:
        float32 [n, 5].
    """
    ids = np.asarray(topk_id, np.int64)
    logp = np.asarray(topk_logp, np.float64)
    cls = _class_of(ids, boundary_class)  # [n, k]
    lower = _logsumexp_by_class(logp, cls)
    if bound == "lower":
        return lower.astype(np.float32)
    missing = np.clip(1.0 - np.exp(logp).sum(axis=1), 0.0, 1.0)  # [n]
    upper = lower.copy()
    with np.errstate(divide="ignore"):
        upper[:, 0] = np.log(np.exp(lower[:, 0]) + missing)
    return upper.astype(np.float32)


def scores_from_prenorm_hidden(
    hidden: Any,
    final_norm: Any,
    lm_head: Any,
    token_ids: np.ndarray,
    class_masks: np.ndarray,
    *,
    top_k: int = 0,
    row_chunk: int = 1024,
) -> TeacherScores:
    """Exact store arrays of one sequence from last-layer hidden states, the final norm and LM head applied by alm.

    vLLM's hidden-state extraction returns the last decoder layer's output *before* the output norm (vLLM docs,
    "Hidden State Extraction"), so the norm is applied here; the rest is `alm.teacher.scoring.scores_from_hidden`,
    the HF backend's own code, in row chunks.

    Args:
        hidden: float [n, d] (numpy or torch), the last decoder layer's output at each position. Pass
            `final_norm=None` for states that are already normalised (the store's `hidden` field).
        final_norm: the teacher's final norm module (e.g. `model.model.norm`) or None.
        lm_head: the teacher's output projection (e.g. `model.lm_head`), [R, d] -> [R, V].
        token_ids: int [n], the sequence's tokens.
        class_masks: bool [5, V] from `alm.teacher.base.boundary_class_masks`.
        top_k: top-k entries per position (0: none).
        row_chunk: rows per LM-head call.

    Returns:
        `TeacherScores` (logp, boundary_logmass, top-k), `boundary_method` "hidden".
    """
    import torch

    from alm.teacher.scoring import class_mass_matrix, scores_from_hidden

    param = next(lm_head.parameters())
    states = torch.as_tensor(hidden)  # [n, d]; no copy for a tensor or a NumPy array
    states = states.to(device=param.device, dtype=param.dtype)

    def head(h: torch.Tensor) -> torch.Tensor:
        return lm_head(final_norm(h) if final_norm is not None else h)

    masks = torch.as_tensor(np.asarray(class_masks), device=param.device)
    ids = torch.as_tensor(np.asarray(token_ids, np.int64))
    with torch.no_grad():
        (scores,) = scores_from_hidden(
            states, head, ids, [int(ids.shape[0])], class_mass_matrix(masks), top_k, row_chunk
        )
    return scores


def teacher_scores_from_request_output(
    request_output: Any,
    boundary_class: np.ndarray,
    *,
    num_logprobs: int,
    boundary_method: BoundaryMethod,
    store_top_k: int = 0,
    candidate_ids: np.ndarray | None = None,
    dummy_last_token: bool = False,
) -> TeacherScores:
    """One `vllm.RequestOutput` -> the `TeacherScores` the store writer takes (same format as the HF backend).

    Args:
        request_output: a `vllm.RequestOutput` of a teacher-forcing request (`max_tokens=1`, `temperature=0`,
            `prompt_logprobs=num_logprobs`, `logprobs=num_logprobs`, optionally `prompt_logprob_token_ids`).
        boundary_class: int8 [V], `Vocab.boundary_class` of the teacher tokenizer.
        num_logprobs: k of the request.
        boundary_method: `token_ids` (needs `candidate_ids`, `prompt_logprob_start=0` and `dummy_last_token`),
            `topk_lower` or `topk_upper`.
        store_top_k: top-k entries to keep in the store (<= num_logprobs; 0: none).
        candidate_ids: int [K], the candidate ids of every row of the request's `prompt_logprob_token_ids`.
        dummy_last_token: the prompt ends with one extra token that is not part of the sequence.

    Returns:
        `TeacherScores` for the n real tokens.

    Raises:
        BackendUnavailableError: the output does not have the expected vLLM 0.33 shape.
    """
    m = len(request_output.prompt_token_ids)
    n = m - 1 if dummy_last_token else m
    arrays = logprob_arrays_from_request_output(request_output, num_logprobs, num_tokens=n)
    match boundary_method:
        case "token_ids":
            if candidate_ids is None or not dummy_last_token:
                raise ValueError(
                    "boundary_method 'token_ids' needs candidate_ids and a dummy last token"
                )
            scores = getattr(request_output, "prompt_token_id_logprobs", None)
            if scores is None:
                raise BackendUnavailableError(
                    "vLLM returned no prompt_token_id_logprobs: fixed token-id scoring needs the V2 model runner "
                    "(VLLM_USE_V2_MODEL_RUNNER=1), max_logprobs >= the number of boundary-class token ids, and "
                    "prefix caching off; or use `teacher.vllm.boundary: topk_lower`"
                )
            blm = boundary_logmass_from_token_scores(scores, candidate_ids, boundary_class, n)
        case "topk_lower" | "topk_upper":
            if arrays.topk_id is None or arrays.topk_logp is None:
                raise ValueError("a top-k boundary bound needs num_logprobs >= 1")
            bound: TopkBound = "lower" if boundary_method == "topk_lower" else "upper"
            blm = boundary_logmass_from_topk(
                arrays.topk_id, arrays.topk_logp, boundary_class, bound
            )
        case _:
            raise ValueError(
                f"boundary_method {boundary_method!r} is not read from a RequestOutput"
            )
    keep = min(store_top_k, num_logprobs)
    return TeacherScores(
        logp=arrays.logp,
        boundary_logmass=blm,
        topk_id=None
        if keep == 0 or arrays.topk_id is None
        else np.ascontiguousarray(arrays.topk_id[:, :keep]),
        topk_logp=None
        if keep == 0 or arrays.topk_logp is None
        else np.ascontiguousarray(arrays.topk_logp[:, :keep]),
    )
