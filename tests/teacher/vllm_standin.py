"""A stand-in for the vLLM 0.33.0 surface alm uses (`LLM`, `SamplingParams`, `inputs.TokensPrompt`), strict like it.

vLLM cannot be installed on CPU machines, so the default test tier runs the adapter (`alm.teacher.vllm`) against
this module. It enforces what vLLM 0.33.0 enforces on the arguments alm builds, each check copied from the wheel's
source (`vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl`; paths relative to its `vllm/` folder, line numbers of
that release). `tests/teacher/test_vllm_wheel.py` (slow tier) runs the same arguments through the wheel's own code,
and pins the cited source lines, so a drift between these copies and 0.33.0 fails there.

- `LLM(**kwargs)` passes its keywords to `EngineArgs` (entrypoints/llm.py), a dataclass: unknown names raise
  `TypeError`; `max_logprobs` defaults to 20 (config/model.py:286).
- `LLM.generate(prompts, sampling_params, *, use_tqdm=...)` (entrypoints/llm.py:417-427): a single params object is
  applied to every prompt, a sequence must have one per prompt (entrypoints/common/offline.py:253-267).
- `SamplingParams._validate_logprobs` (sampling_params.py:922-1048): `logprobs`/`prompt_logprobs` <= max_logprobs;
  `prompt_logprob_token_ids` must be a 2-D non-empty integer array or list of lists, at most max_model_len - 1
  rows, at most max_logprobs ids per row, ids in [-1, vocab); stored back as contiguous int32;
  `prompt_logprob_start` >= 0 and only with `prompt_logprob_token_ids`.
- `InputProcessor` (v1/engine/input_processor.py:163-169, 464-475): `prompt_logprob_token_ids` needs the V2 model
  runner, and its row count must equal `prompt_len - 1 - prompt_logprob_start` for each prompt.

The engine itself runs a Hugging Face model on CPU and answers in vLLM's `RequestOutput` shapes
(`test_vllm_convert.request_output_from_logp`). `hidden` (speculative hidden-state extraction) is not emulated.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# EngineArgs fields (engine/arg_utils.py:488ff) that alm may pass; any other keyword is refused like a dataclass does
ENGINE_ARG_NAMES = frozenset(
    {
        "model",
        "revision",
        "dtype",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_num_batched_tokens",
        "max_num_seqs",
        "max_model_len",
        "logprobs_mode",
        "max_logprobs",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "enforce_eager",
        "seed",
        "speculative_config",
        "kv_transfer_config",
    }
)
# SamplingParams fields (sampling_params.py:300-400) alm may pass; msgspec.Struct refuses unknown keywords
SAMPLING_PARAM_NAMES = frozenset(
    {
        "max_tokens",
        "temperature",
        "prompt_logprobs",
        "logprobs",
        "flat_logprobs",
        "detokenize",
        "prompt_logprob_token_ids",
        "prompt_logprob_start",
        "skip_clone",
    }
)
DEFAULT_MAX_LOGPROBS = 20  # config/model.py:286


class VLLMValidationError(ValueError):
    """vllm/exceptions.py:28 (a client error, itself a ValueError)."""


class SamplingParams:
    """Keyword-only like the msgspec.Struct; `validate_logprobs` is `_validate_logprobs` (sampling_params.py)."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_PARAM_NAMES
        if unknown:
            raise TypeError(f"Unexpected keyword argument(s) {sorted(unknown)}")
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.temperature = kwargs.get("temperature", 1.0)
        self.prompt_logprobs = kwargs.get("prompt_logprobs")
        self.logprobs = kwargs.get("logprobs")
        self.flat_logprobs = kwargs.get("flat_logprobs", False)
        self.detokenize = kwargs.get("detokenize", True)
        self.prompt_logprob_token_ids = kwargs.get("prompt_logprob_token_ids")
        self.prompt_logprob_start = kwargs.get("prompt_logprob_start")
        self.skip_clone = kwargs.get("skip_clone", False)

    def validate_logprobs(self, max_logprobs: int, max_model_len: int, vocab_size: int) -> None:
        """sampling_params.py:922-1048, the parts that concern alm's arguments."""
        if max_logprobs == -1:  # :924-925
            max_logprobs = vocab_size
        if (num := self.logprobs) and (vocab_size if num == -1 else num) > max_logprobs:  # :928-937
            raise VLLMValidationError(
                f"Requested sample logprobs of {num}, which is greater than max allowed: {max_logprobs}"
            )
        if (num := self.prompt_logprobs) and (
            vocab_size if num == -1 else num
        ) > max_logprobs:  # :972-982
            raise VLLMValidationError(
                f"Requested prompt logprobs of {num}, which is greater than max allowed: {max_logprobs}"
            )
        ids = self.prompt_logprob_token_ids
        if ids is None:
            if self.prompt_logprob_start is not None:  # :1043-1048
                raise VLLMValidationError("prompt_logprob_start requires prompt_logprob_token_ids.")
            return
        shape: tuple[int, ...] = ()  # :984-998
        if isinstance(ids, list) and all(isinstance(row, list) for row in ids):
            shape = (len(ids), max(map(len, ids), default=0))
        elif isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
            shape = ids.shape
        if len(shape) != 2 or 0 in shape:
            raise VLLMValidationError(
                "prompt_logprob_token_ids must be a non-empty integer array of shape [num_rows, num_ids]."
            )
        if shape[0] > max_model_len - 1:  # :999-1006
            raise VLLMValidationError(
                f"prompt_logprob_token_ids has {shape[0]} rows, but a prompt has at most {max_model_len - 1} "
                "scored rows (max_model_len - 1)."
            )
        if shape[1] > max_logprobs:  # :1007-1016
            raise VLLMValidationError(
                f"Requested {shape[1]} token ids per row in prompt_logprob_token_ids, which is greater than max "
                f"allowed: {max_logprobs}. Set max_logprobs (--max-logprobs) to at least {shape[1]}."
            )
        array = np.asarray(ids if isinstance(ids, np.ndarray) else _pad(ids, shape[1]), np.int64)
        if int(array.min()) < -1 or int(array.max()) >= vocab_size:  # :1026-1034
            raise VLLMValidationError(
                f"prompt_logprob_token_ids contain out-of-vocab token ids (-1 pads a row). Vocabulary size: "
                f"{vocab_size}"
            )
        self.prompt_logprob_token_ids = np.ascontiguousarray(array, dtype=np.int32)  # :1036
        if self.prompt_logprob_start is not None and self.prompt_logprob_start < 0:  # :1037-1042
            raise VLLMValidationError("prompt_logprob_start must be non-negative.")


def _pad(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), -1, np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def params_to_seq(params: Any, num_requests: int) -> Sequence[Any]:
    """entrypoints/common/offline.py:253-267."""
    if isinstance(params, Sequence):
        if len(params) != num_requests:
            raise VLLMValidationError(
                f"The lengths of prompts ({num_requests}) and params ({len(params)}) must be the same."
            )
        return params
    return [params] * num_requests


def check_request(params: Any, prompt_len: int) -> None:
    """v1/engine/input_processor.py:163-169 (V2 model runner) and 464-475 (row count per prompt)."""
    rows = params.prompt_logprob_token_ids
    if rows is None:
        return
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") in ("0", "false", "False"):
        raise VLLMValidationError(
            "prompt_logprob_token_ids requires the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1)."
        )
    start = params.prompt_logprob_start or 0
    num_rows = max(prompt_len - 1 - start, 0)
    if len(rows) != num_rows:
        raise VLLMValidationError(
            f"prompt_logprob_token_ids has {len(rows)} rows, but the prompt has {num_rows} scored rows "
            "(prompt_len - 1 - prompt_logprob_start)."
        )


def standin_vllm_module(engine_log: list, real: Any = None) -> types.ModuleType:
    """A module with vLLM 0.33's `LLM`, `SamplingParams`, `inputs.TokensPrompt` and `__version__` surface.

    Args:
        engine_log: receives one dict per `LLM(...)` (its keywords) and one `("generate", prompts, params)` tuple
            per `generate` call.
        real: None (every check is the copy in this module), or an object with the real vLLM's `SamplingParams`,
            `EngineArgs`, `params_to_seq` and `TokensPrompt` (the slow tier, `vllm_wheel_check.py`): then the
            engine's arguments build a real `EngineArgs`, the params are real and checked by their own `verify`,
            and prompts are paired with params by vLLM's own `_params_to_seq`.
    """
    from teacher.test_vllm_convert import request_output_from_logp
    from transformers import AutoModelForCausalLM

    pair = params_to_seq if real is None else real.params_to_seq

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            if real is None:
                unknown = set(kwargs) - ENGINE_ARG_NAMES
                if unknown:
                    raise TypeError(
                        f"EngineArgs.__init__() got unexpected keyword argument(s) {sorted(unknown)}"
                    )
            else:
                real.EngineArgs(**kwargs)  # LLM(**kwargs) builds EngineArgs(model=..., **kwargs)
            engine_log.append(kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(
                kwargs["model"], dtype=torch.float32
            ).eval()
            config = self.model.config
            self.max_logprobs = int(kwargs.get("max_logprobs", DEFAULT_MAX_LOGPROBS))
            self.max_model_len = int(kwargs.get("max_model_len") or config.max_position_embeddings)
            self.vocab_size = int(config.vocab_size)
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(hf_config=config)
            )

        def generate(
            self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True
        ) -> list[Any]:
            prompts = list(prompts)
            seq_params = pair(sampling_params, len(prompts))
            engine_log.append(("generate", prompts, list(seq_params)))
            checked = []
            for prompt, params in zip(prompts, seq_params, strict=True):
                ids = list(prompt["prompt_token_ids"])
                if real is None:
                    params.validate_logprobs(self.max_logprobs, self.max_model_len, self.vocab_size)
                else:  # vLLM's own validation, as InputProcessor._validate_params calls it (:157-162)
                    params.verify(
                        types.SimpleNamespace(  # the ModelConfig fields verify() reads for alm's requests
                            max_logprobs=self.max_logprobs,
                            max_model_len=self.max_model_len,
                            get_vocab_size=lambda: self.vocab_size,
                            is_diffusion=False,
                        ),
                        None,
                        None,
                        None,
                    )
                check_request(params, len(ids))
                checked.append((ids, params))
            outputs = []
            for ids, params in checked:
                with torch.no_grad():
                    logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
                peak = logits.amax(-1, keepdim=True)
                logp = (logits - peak - (logits - peak).exp().sum(-1, keepdim=True).log()).numpy()
                candidates = params.prompt_logprob_token_ids
                outputs.append(
                    request_output_from_logp(
                        logp,
                        ids,
                        int(params.prompt_logprobs or 0),
                        "flat" if params.flat_logprobs else "dict",
                        candidate_ids=None if candidates is None else np.asarray(candidates),
                        sample_logprobs=params.logprobs is not None,
                    )
                )
            return outputs

    module = types.ModuleType("vllm")
    module.__version__ = "0.33.0+standin"
    module.LLM = LLM  # pyright: ignore[reportAttributeAccessIssue]
    module.SamplingParams = SamplingParams if real is None else real.SamplingParams  # pyright: ignore[reportAttributeAccessIssue]
    module.inputs = types.ModuleType("vllm.inputs")  # pyright: ignore[reportAttributeAccessIssue]
    module.inputs.TokensPrompt = dict if real is None else real.TokensPrompt  # pyright: ignore[reportAttributeAccessIssue]
    return module
