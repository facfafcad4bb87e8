"""GPU check (`just gpu-check`): HF and vLLM teacher backends on the same data, compared, with throughput.

    .venv/bin/python bench/gpu_check.py                       # SmolLM2 demo teacher, 256 stdlib docs
    .venv/bin/python bench/gpu_check.py --teacher Qwen/Qwen2.5-0.5B --limit 1024 --max-length 1024
    .venv/bin/python bench/gpu_check.py --vllm-methods token_ids topk_lower --peak-tflops 989

On a CUDA machine it runs `alm precompute` with `teacher.backend: hf`, then (when vLLM is installed) with
`teacher.backend: vllm` for each requested boundary method, on the same documents, and compares every vLLM store
with the HF store (`alm.store.inspect.compare_stores_stats`: max/mean |Δlogp|, |Δboundary_logmass|, γ-merge
decisions that differ). One line per figure. Throughput is teacher tokens per second of the whole precompute
(model load excluded and reported on its own line; a warm-up on 8 documents comes first), and the fraction of the GPU's peak dense bf16 FLOP rate that `2 × linear-layer parameters ×
tokens / time` reaches (attention's own FLOPs are left out, so the fraction is a slight underestimate).

On a machine without CUDA it prints why and exits with code 2: nothing can be checked there.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Peak dense bf16 tensor-core TFLOP/s (vendor data sheets, SXM parts; no sparsity). Override with --peak-tflops.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "V100": 125.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def linear_params(model_path: str) -> int:
    """Weights of every nn.Linear (incl. a tied LM head once): the matmuls of one forward token, / 2 FLOPs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def run_backend(recipe: Path, out: Path, overrides: list[str]) -> dict[str, float]:
    """Load the teacher once, warm it up on 8 documents, then time a whole precompute into a fresh `out`.

    The timed run is everything `alm precompute` does (rendering, scoring, writing, finalizing) except loading the
    model, which is timed on its own. Returns seconds, tokens and load seconds.
    """
    import alm.precompute as precompute
    from alm.config.precompute import load_precompute_recipe
    from alm.store.reader import open_store
    from alm.teacher.default import resolve_teacher_path
    from alm.teacher.hf import load_tokenizer
    from alm.vocab import vocab_from_tokenizer

    recipe_cfg = load_precompute_recipe(recipe, overrides)
    model_path = resolve_teacher_path(recipe_cfg.teacher.model)
    tokenizer = load_tokenizer(model_path, recipe_cfg.teacher.revision)
    vocab = vocab_from_tokenizer(tokenizer, name=recipe_cfg.teacher.model)
    start = time.perf_counter()
    teacher = precompute.load_teacher(recipe_cfg, model_path, vocab.boundary_class)
    load_seconds = time.perf_counter() - start
    original = precompute.load_teacher
    precompute.load_teacher = lambda *args, **kwargs: teacher
    try:
        warmup = out.parent / f"{out.name}_warmup"
        precompute.run_precompute(
            recipe, [*overrides, f"output={warmup}", "data.limit=8"], overwrite=True
        )
        shutil.rmtree(warmup, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        precompute.run_precompute(recipe, [*overrides, f"output={out}"], shard="0/1")
        seconds = time.perf_counter() - start
    finally:
        precompute.load_teacher = original
        gc.collect()
    tokens = open_store(str(out)).manifest.num_tokens
    return {"seconds": seconds, "tokens": tokens, "load_seconds": load_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--recipe", default="stages/demo_precompute.yaml", type=Path)
    parser.add_argument("--limit", type=int, default=256, help="documents")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the stores (default: a temp dir)"
    )
    parser.add_argument(
        "--vllm-methods",
        nargs="*",
        default=["token_ids", "topk_lower"],
        choices=["token_ids", "hidden", "topk_lower", "topk_upper"],
    )
    parser.add_argument("--num-logprobs", type=int, default=20, help="k for the top-k bound")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s"
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device on this machine; this check needs a GPU (it compares the HF and vLLM "
            "teacher backends on one). The CPU tests cover the rest: `just test`.",
            file=sys.stderr,
        )
        return 2

    from alm.store.inspect import compare_stores_stats
    from alm.teacher.default import resolve_teacher_path

    device_name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(device_name)
    model_path = resolve_teacher_path(args.teacher)
    flops_per_token = 2 * linear_params(model_path)
    print(f"device: {device_name} (peak bf16 {peak or 'unknown'} TFLOP/s)")
    print(f"teacher: {args.teacher} ({flops_per_token / 2 / 1e6:.1f} M linear-layer parameters)")

    out_root = args.out or Path(tempfile.mkdtemp(prefix="alm-gpu-check-"))
    common = [
        f"teacher.model={args.teacher}",
        "teacher.device=cuda",
        f"data.limit={args.limit}",
        f"max_length={args.max_length}",
        f"token_budget={args.token_budget}",
        "shard_size=1000000",
    ]
    results: dict[str, dict] = {}

    def report(name: str, run: dict[str, float]) -> None:
        rate = run["tokens"] / run["seconds"]
        fraction = flops_per_token * rate / (peak * 1e12) if peak else float("nan")
        results[name] = {**run, "tokens_per_s": rate, "flop_fraction": fraction}
        print(f"{name}: model load {run['load_seconds']:.1f} s (not in the throughput)")
        print(f"{name}: {run['tokens']} tokens in {run['seconds']:.2f} s = {rate:,.0f} tokens/s")
        print(f"{name}: forward FLOP rate / peak = {fraction:.4f}")

    hf_store = out_root / "hf"
    report("hf", run_backend(args.recipe, hf_store, [*common, "teacher.backend=hf"]))
    torch.cuda.empty_cache()

    if importlib.util.find_spec("vllm") is None:
        print("vllm: not installed (pip install 'alm[vllm]'); HF backend only")
    for method in args.vllm_methods if importlib.util.find_spec("vllm") else []:
        store = out_root / f"vllm_{method}"
        overrides = [
            *common,
            "teacher.backend=vllm",
            f"teacher.vllm.boundary_method={method}",
            f"teacher.vllm.num_logprobs={args.num_logprobs}",
            "teacher.vllm.gpu_memory_utilization=0.6",
        ]
        name = f"vllm[{method}]"
        try:
            run = run_backend(args.recipe, store, overrides)
        except Exception as exc:  # report and go on with the next method
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            continue
        report(name, run)
        torch.cuda.empty_cache()
        stats = compare_stores_stats(str(hf_store), str(store))
        results[name]["compare_hf"] = stats
        print(
            f"{name} vs hf: |Δlogp| max {stats['logp']['max']:.3g} mean {stats['logp']['mean']:.3g}"
        )
        default_set = stats["boundary_logmass"]["default_set"]
        print(
            f"{name} vs hf: |Δboundary_logmass| (default set) max {default_set['max']:.3g} "
            f"mean {default_set['mean']:.3g}, {default_set['num_finite_mismatch']} finite-mismatches"
        )
        print(
            f"{name} vs hf: merge decisions that differ {stats['merge_decisions_differ']} "
            f"of {stats['num_positions']}"
        )
        if "hf" in results:
            print(
                f"{name}: throughput vs hf = {results[name]['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x"
            )
    (out_root / "gpu_check.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"stores and gpu_check.json in {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
