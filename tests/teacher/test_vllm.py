"""The vLLM adapter (`alm.teacher.vllm`) against a stand-in engine that enforces vLLM 0.33.0's argument checks.

`tests/teacher/vllm_standin.py` copies those checks from the 0.33.0 wheel (cited by file and line); the slow tier
(`test_vllm_wheel.py`) runs the same arguments through the wheel's own code. Here: the requests the adapter builds
(one `SamplingParams` per prompt, `prompt_logprob_token_ids` as `[len(prompt) - 1, K]`), that the stand-in refuses
what 0.33.0 refuses, the automatic `max_num_batched_tokens` bound, the settings refused before an engine is built,
the dtype rule, `batch_invariant` and `revision`.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest

import alm.teacher.vllm as vllm_backend
from alm.errors import BackendUnavailableError, ConfigError
from alm.teacher.vllm import (
    TOKEN_IDS_GPU_BYTES_PER_ID,
    VLLMTeacher,
    read_model_config,
    request_logprobs,
    resolve_vllm_dtype,
    sampling_arguments,
    token_ids_max_batched_tokens,
)
from alm.teacher.vllm_convert import boundary_token_ids
from tests.tolerance import assert_fp32_close

VOCAB = 96


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from factories import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(VOCAB, seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def boundary_class():
    rng = np.random.default_rng(0)
    classes = rng.choice(np.array([-1, -1, -1, 0, 0, 1, 2, 3], np.int8), size=VOCAB)
    classes[:3] = 4
    return classes


@pytest.fixture
def engine(monkeypatch):
    """The stand-in vLLM module installed where the adapter imports it; yields its call log."""
    from teacher.vllm_standin import standin_vllm_module

    log: list = []
    module = standin_vllm_module(log)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", module.inputs)
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: module)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    return log


def _sequences(lengths=(5, 12, 2, 9)) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, VOCAB, size=n) for n in lengths]


@functools.lru_cache(maxsize=2)
def _model(teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def _exact(teacher_dir, ids, boundary_class, top_k):
    import torch

    from alm.teacher.base import boundary_class_masks
    from alm.teacher.scoring import scores_from_logits

    model = _model(teacher_dir)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids.tolist()])).logits[0]
    masks = boundary_class_masks(boundary_class, VOCAB)
    return scores_from_logits(logits, np.asarray(ids), masks, top_k=top_k)


# --------------------------------------------------------------------------------------------------------------
# token_ids requests
# --------------------------------------------------------------------------------------------------------------


def test_token_ids_sends_one_params_per_prompt_with_a_row_of_candidates_per_scored_token(
    engine, teacher_dir, boundary_class
):
    teacher = VLLMTeacher(
        str(teacher_dir), boundary_class, max_model_len=40, top_k=3, num_logprobs=6
    )
    sequences = _sequences()
    scores = teacher.score(sequences)
    engine_args, (name, prompts, params) = engine
    assert name == "generate"
    candidates = boundary_token_ids(boundary_class)
    assert engine_args["max_logprobs"] == len(candidates)
    assert len(params) == len(prompts) == len(sequences)
    assert len({id(p) for p in params}) == len(params)
    for seq, prompt, p in zip(sequences, prompts, params, strict=True):
        assert len(prompt["prompt_token_ids"]) == len(seq) + 1  # the dummy token
        ids = p.prompt_logprob_token_ids  # made contiguous int32 by the (stand-in) validation
        assert ids.dtype == np.int32 and ids.shape == (len(seq), len(candidates))
        assert (ids == candidates[None, :]).all()
        assert p.prompt_logprob_start == 0
        assert (p.prompt_logprobs, p.logprobs) == (
            3,
            None,
        )  # the stored top-k only, no sample log-probs
    for seq, got in zip(sequences, scores, strict=True):
        exact = _exact(teacher_dir, seq, boundary_class, 3)
        assert_fp32_close(got.logp, exact.logp, equal_nan=True)
        assert_fp32_close(got.boundary_logmass, exact.boundary_logmass)
        np.testing.assert_array_equal(got.topk_id, exact.topk_id)
        assert got.boundary_logmass.dtype == np.float32


def test_token_ids_with_top_k_zero_asks_for_the_actual_token_only(
    engine, teacher_dir, boundary_class
):
    teacher = VLLMTeacher(str(teacher_dir), boundary_class, max_model_len=40, top_k=0)
    (seq,) = _sequences((7,))
    (scores,) = teacher.score([seq])
    (_, _, (params,)) = engine[1]
    assert (params.prompt_logprobs, params.logprobs) == (0, None)
    assert scores.topk_id is None
    assert_fp32_close(scores.logp, _exact(teacher_dir, seq, boundary_class, 0).logp, equal_nan=True)


def test_topk_methods_ask_for_k_prompt_and_sample_logprobs():
    assert request_logprobs("topk_lower", 20, 5) == (20, 20)
    assert request_logprobs("topk_upper", 8, 0) == (8, 8)
    assert request_logprobs("token_ids", 20, 5) == (5, None)
    assert request_logprobs("hidden", 20, 5) == (None, None)


def test_generate_calls_are_bounded_by_four_engine_steps_of_tokens(
    engine, teacher_dir, boundary_class
):
    teacher = VLLMTeacher(
        str(teacher_dir),
        boundary_class,
        max_model_len=16,
        max_num_batched_tokens=16,
        token_ids_memory_gib=1.0,
    )
    lengths = (10, 14, 3, 12, 9, 14, 1, 5, 13)
    sequences = _sequences(lengths)
    scores = teacher.score(sequences)
    calls = engine[1:]
    assert len(calls) > 1
    assert [len(p) for _, p, _ in calls] and sum(len(p) for _, p, _ in calls) == len(lengths)
    for _, prompts, _ in calls:
        tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        assert tokens <= 4 * 16 or len(prompts) == 1
    for seq, got in zip(sequences, scores, strict=True):  # order kept across calls
        assert got.num_tokens == len(seq)
        assert_fp32_close(
            got.logp, _exact(teacher_dir, seq, boundary_class, 0).logp, equal_nan=True
        )


def test_sampling_arguments_broadcast_the_candidates_without_copying_them():
    candidates = np.arange(3, 3000, dtype=np.int64)
    kwargs = sampling_arguments(513, prompt_logprobs=0, logprobs=None, candidate_ids=candidates)
    ids = kwargs["prompt_logprob_token_ids"]
    assert ids.shape == (512, candidates.size) and ids.dtype == np.int32
    assert ids.strides[0] == 0  # a view: K int32 in memory, not 512 x K
    assert kwargs["skip_clone"] is True and kwargs["prompt_logprob_start"] == 0
    assert "prompt_logprob_token_ids" not in sampling_arguments(
        5, prompt_logprobs=4, logprobs=4, candidate_ids=None
    )


# --------------------------------------------------------------------------------------------------------------
# the stand-in refuses what vLLM 0.33.0 refuses
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def standin_llm(engine, teacher_dir):
    import vllm  # the stand-in, installed by `engine`

    return vllm.LLM(model=str(teacher_dir), max_logprobs=50, max_model_len=32), vllm


def _prompt(n):
    return {"prompt_token_ids": list(range(1, n + 1))}


def test_standin_refuses_a_flat_list_of_candidate_ids(standin_llm):
    from teacher.vllm_standin import VLLMValidationError

    llm, vllm = standin_llm
    shared = vllm.SamplingParams(
        max_tokens=1, prompt_logprobs=0, prompt_logprob_token_ids=[4, 5, 6], prompt_logprob_start=0
    )
    with pytest.raises(VLLMValidationError, match=r"shape \[num_rows, num_ids\]"):
        llm.generate([_prompt(5)], shared)


def test_standin_refuses_rows_that_do_not_match_each_prompt(standin_llm):
    from teacher.vllm_standin import VLLMValidationError

    llm, vllm = standin_llm
    rows = np.tile(np.array([4, 5, 6], np.int32), (4, 1))  # right for a 5-token prompt only
    shared = vllm.SamplingParams(
        max_tokens=1, prompt_logprobs=0, prompt_logprob_token_ids=rows, prompt_logprob_start=0
    )
    llm.generate([_prompt(5)], shared)
    with pytest.raises(VLLMValidationError, match="has 4 rows, but the prompt has 6 scored rows"):
        llm.generate([_prompt(5), _prompt(7)], shared)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_logprobs": 51}, "prompt logprobs of 51"),
        ({"logprobs": 60}, "sample logprobs of 60"),
        ({"prompt_logprob_token_ids": np.zeros((4, 51), np.int32)}, "at least 51"),
        ({"prompt_logprob_token_ids": np.full((4, 2), VOCAB, np.int32)}, "out-of-vocab"),
        ({"prompt_logprob_token_ids": np.zeros((40, 2), np.int32)}, "at most 31"),
        ({"prompt_logprob_start": 0}, "requires prompt_logprob_token_ids"),
    ],
)
def test_standin_enforces_max_logprobs_vocabulary_and_lengths(standin_llm, kwargs, message):
    from teacher.vllm_standin import VLLMValidationError

    llm, vllm = standin_llm
    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([_prompt(5)], vllm.SamplingParams(max_tokens=1, **kwargs))


def test_standin_needs_one_params_per_prompt_and_known_keywords(standin_llm, teacher_dir):
    from teacher.vllm_standin import VLLMValidationError

    llm, vllm = standin_llm
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=2)
    with pytest.raises(VLLMValidationError, match=r"prompts \(2\) and params \(1\)"):
        llm.generate([_prompt(3), _prompt(4)], [params])
    with pytest.raises(TypeError):
        vllm.SamplingParams(max_tokens=1, prompt_logprob_ids=[[1]])
    with pytest.raises(TypeError):
        vllm.LLM(model=str(teacher_dir), max_logprob=5)


# --------------------------------------------------------------------------------------------------------------
# token_ids memory: max_num_batched_tokens bounded from K
# --------------------------------------------------------------------------------------------------------------


def test_batched_tokens_bound_follows_thirteen_bytes_per_candidate_and_row():
    assert TOKEN_IDS_GPU_BYTES_PER_ID == 13
    # SmolLM2: K = 32,128 boundary-class ids, 418 KB per row; 4 GiB hold 10,283 rows
    k, gib, max_model_len = 32_128, 4.0, 194
    rows = int(gib * 2**30) // (13 * k)
    assert rows == 10_283
    assert token_ids_max_batched_tokens(k, 8192, max_model_len, gib) == 8192
    assert token_ids_max_batched_tokens(k, 16_384, max_model_len, gib) == rows - max_model_len
    # a 128k vocabulary with ~3x the ids gets ~3x fewer tokens per step
    rows_large = int(gib * 2**30) // (13 * 3 * k)
    assert token_ids_max_batched_tokens(3 * k, 16_384, 514, gib) == rows_large - 514 == 2_913
    with pytest.raises(ConfigError, match=r"token_ids_memory_gib 0\.1.*at least 0\.15.*hidden"):
        token_ids_max_batched_tokens(k, 8192, 194, 0.1)


def test_the_adapter_passes_the_bounded_batch_to_the_engine(engine, teacher_dir, boundary_class):
    k = len(boundary_token_ids(boundary_class))
    gib = 13 * k * 300 / 2**30  # room for 300 rows
    VLLMTeacher(
        str(teacher_dir),
        boundary_class,
        max_model_len=100,
        max_num_batched_tokens=8192,
        token_ids_memory_gib=gib,
    )
    assert engine[0]["max_num_batched_tokens"] == 200  # 300 rows - one prompt carried over


# --------------------------------------------------------------------------------------------------------------
# refused before an engine is built; dtype; batch invariance; revision
# --------------------------------------------------------------------------------------------------------------


def test_hidden_refuses_prompts_longer_than_one_step_before_building_the_engine(
    engine, teacher_dir, boundary_class
):
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(512\) to at least 1026"):
        VLLMTeacher(
            str(teacher_dir),
            boundary_class,
            boundary_method="hidden",
            max_model_len=1026,
            max_num_batched_tokens=512,
        )
    assert engine == []


def test_hidden_refuses_an_architecture_it_does_not_reproduce_before_building_the_engine(
    engine, tmp_path, boundary_class
):
    import transformers

    config = transformers.GraniteConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, logits_scaling=8.0, architectures=["GraniteForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    with pytest.raises(BackendUnavailableError, match="GraniteForCausalLM"):
        VLLMTeacher(str(tmp_path), boundary_class, boundary_method="hidden", max_model_len=64)
    assert engine == []


@pytest.mark.parametrize(
    ("requested", "stored", "expected"),
    [
        ("auto", "float16", "float16"),
        ("auto", "bfloat16", "bfloat16"),
        ("auto", "float32", "bfloat16"),
        ("auto", None, "bfloat16"),
        ("float32", "float16", "float32"),
        ("float16", "bfloat16", "float16"),
    ],
)
def test_auto_dtype_keeps_a_16_bit_checkpoints_own_dtype(requested, stored, expected):
    assert resolve_vllm_dtype(requested, {"dtype": stored}) == expected
    assert resolve_vllm_dtype(requested, {"torch_dtype": stored}) == expected


def test_the_engine_gets_the_resolved_dtype(engine, tmp_path, boundary_class):
    import json

    from factories import tiny_llama

    tiny_llama(VOCAB).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    teacher = VLLMTeacher(str(tmp_path), boundary_class, boundary_method="topk_lower")
    assert engine[0]["dtype"] == "float16" == teacher.dtype


def test_batch_invariant_sets_vllms_switch(engine, teacher_dir, boundary_class):
    VLLMTeacher(str(teacher_dir), boundary_class, boundary_method="topk_lower")
    assert "VLLM_BATCH_INVARIANT" not in os.environ
    VLLMTeacher(
        str(teacher_dir), boundary_class, boundary_method="topk_lower", batch_invariant=True
    )
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"


def test_revision_reaches_autoconfig_and_snapshot_download(monkeypatch, teacher_dir):
    import huggingface_hub
    import transformers

    seen = []
    real_auto_config = transformers.AutoConfig

    class RecordingAutoConfig:
        @staticmethod
        def from_pretrained(name, revision=None):
            seen.append(("config", name, revision))
            return real_auto_config.from_pretrained(teacher_dir)

    def recording_snapshot_download(name, revision=None, allow_patterns=None):
        seen.append(("snapshot", name, revision))
        return str(teacher_dir)

    monkeypatch.setattr(transformers, "AutoConfig", RecordingAutoConfig)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    config = read_model_config("org/teacher", "abc123")
    vllm_backend._FinalNormHead("org/teacher", config, device="cpu", revision="abc123")
    assert seen == [("config", "org/teacher", "abc123"), ("snapshot", "org/teacher", "abc123")]
