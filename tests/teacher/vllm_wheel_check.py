"""Run alm's vLLM adapter on a real recipe with vLLM 0.33.0's own validation code (CPU; child of test_vllm_wheel.py).

    PYTHONPATH=WHEEL/src:WHEEL/deps:REPO:REPO/tests python tests/teacher/vllm_wheel_check.py OUT_DIR

The wheel's Python sources import without a GPU; its engine does not run. So `vllm.LLM` is replaced by the stand-in
engine of `vllm_standin.py` (a Hugging Face model on CPU answering in vLLM's output shapes), but everything alm
hands to vLLM goes through vLLM's own code: `EngineArgs(**llm_kwargs)`, the real `SamplingParams` class, its
`verify()` (as `InputProcessor._validate_params` calls it), `OfflineInferenceMixin._params_to_seq` and the real
`TokensPrompt`. The recipe is `stages/demo_precompute_vllm.yaml` (SmolLM2-135M-Instruct, K = 32,128 boundary ids,
max_length 192) on its first documents; the same documents go through the HF backend for comparison. Prints one
JSON object.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(out_dir: Path) -> dict:
    import vllm.sampling_params as real_sampling  # pyright: ignore[reportMissingImports]
    from teacher.vllm_standin import standin_vllm_module
    from vllm.engine.arg_utils import EngineArgs  # pyright: ignore[reportMissingImports]
    from vllm.entrypoints.common.offline import (  # pyright: ignore[reportMissingImports]
        OfflineInferenceMixin,
    )
    from vllm.entrypoints.llm import LLM  # pyright: ignore[reportMissingImports]
    from vllm.exceptions import VLLMValidationError  # pyright: ignore[reportMissingImports]
    from vllm.inputs import TokensPrompt  # pyright: ignore[reportMissingImports]

    import alm.teacher.vllm as vllm_backend
    from alm.precompute import run_precompute
    from alm.store.inspect import compare_stores_stats

    result: dict = {"generate_signature": list(inspect.signature(LLM.generate).parameters)}
    model_config = types.SimpleNamespace(
        max_logprobs=32_128, max_model_len=194, get_vocab_size=lambda: 49_152, is_diffusion=False
    )
    # the adapter's old request: one shared SamplingParams with a flat list of candidate ids
    old = real_sampling.SamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=20,
        logprobs=20,
        flat_logprobs=True,
        detokenize=False,
        prompt_logprob_token_ids=list(range(100)),
        prompt_logprob_start=0,
    )
    try:
        old.verify(model_config, None, None, None)
        result["old_form_error"] = None
    except VLLMValidationError as exc:
        result["old_form_error"] = str(exc)

    real = types.SimpleNamespace(
        SamplingParams=real_sampling.SamplingParams,
        EngineArgs=EngineArgs,
        params_to_seq=lambda params, n: OfflineInferenceMixin._params_to_seq(None, params, n),  # pyright: ignore[reportArgumentType]
        TokensPrompt=TokensPrompt,
    )
    log: list = []
    module = standin_vllm_module(log, real=real)
    vllm_backend.import_vllm = lambda: module
    overrides = ["data.limit=6", "shard_size=6"]
    vllm_store = out_dir / "vllm"
    run_precompute(
        REPO / "stages" / "demo_precompute_vllm.yaml",
        [*overrides, f"output={vllm_store}"],
        shard="0/1",
    )
    engine_kwargs, *calls = log
    result["engine_kwargs"] = {
        k: v for k, v in engine_kwargs.items() if isinstance(v, (int, float, str, bool))
    }
    requests = []
    for _, prompts, params in calls:
        for prompt, p in zip(prompts, params, strict=True):
            ids = p.prompt_logprob_token_ids
            requests.append(
                {
                    "class": f"{type(p).__module__}.{type(p).__qualname__}",
                    "prompt_len": len(prompt["prompt_token_ids"]),
                    "rows_shape": list(ids.shape),
                    "rows_dtype": str(ids.dtype),
                    "rows_contiguous": bool(ids.flags.c_contiguous),
                    "prompt_logprobs": p.prompt_logprobs,
                    "logprobs": p.logprobs,
                    "start": p.prompt_logprob_start,
                    "all_rows_equal": bool((ids == ids[:1]).all()),
                }
            )
    result["requests"] = requests
    result["num_generate_calls"] = len(calls)
    hf_store = out_dir / "hf"
    run_precompute(
        REPO / "stages" / "demo_precompute.yaml",
        [*overrides, "teacher.device=cpu", f"output={hf_store}"],
        shard="0/1",
    )
    stats = compare_stores_stats(str(hf_store), str(vllm_store))
    result["max_abs_logp_diff"] = float(stats["logp"]["max"])
    result["boundary_logmass"] = {
        name: {"max": float(d["max"]), "num_finite_mismatch": int(d["num_finite_mismatch"])}
        for name, d in stats["boundary_logmass"].items()
    }
    result["merge_decisions_differ"] = int(stats["merge_decisions_differ"])
    # the hidden method's extra engine arguments are EngineArgs fields too
    config = vllm_backend.read_model_config(engine_kwargs["model"])
    EngineArgs(
        **engine_kwargs, **vllm_backend.hidden_engine_arguments(config, str(out_dir / "hidden"))
    )
    result["hidden_engine_args_accepted"] = True
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
