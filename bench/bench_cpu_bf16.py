"""CPU teacher precision: a bf16 trunk (with the fp32 LM head) against fp32, speed and |Δlogp| (issue 11 target 5).

    .venv/bin/python bench/bench_cpu_bf16.py [--docs 32] [--max-length 128] [--rounds 2]

Scores the same rendered demo documents with the embedded SmolLM2-135M teacher through `HFTeacher`, once with
fp32 weights and once with bf16 weights (`teacher.dtype: bfloat16`; the head is always applied in fp32), rounds
alternating, best time of each kept. Prints the CPU's bf16 support (lscpu flags), tokens/s of each and their ratio,
and max / mean |Δlogp| and |Δ default-set boundary log-mass| of bf16 against fp32. The machine may be shared: read
the speed as a ratio within this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alm.config.precompute import load_precompute_recipe  # noqa: E402
from alm.precompute import load_documents  # noqa: E402
from alm.teacher.default import resolve_teacher_path  # noqa: E402
from alm.teacher.hf import HFTeacher, load_tokenizer  # noqa: E402
from alm.templates import render, resolve_family  # noqa: E402
from alm.vocab import vocab_from_tokenizer  # noqa: E402


def cpu_bf16_flags() -> list[str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    return sorted(f for f in flags.split() if f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe_path = REPO / "stages" / "demo_precompute.yaml"
    recipe = load_precompute_recipe(recipe_path, [f"data.limit={args.docs}"])
    selected = load_documents(recipe, recipe_path)
    model_path = resolve_teacher_path(recipe.teacher.model)
    tokenizer = load_tokenizer(model_path)
    vocab = vocab_from_tokenizer(tokenizer)
    family = resolve_family(recipe.teacher.family, tokenizer)
    seqs = [
        render(d, tokenizer, vocab, family, max_length=args.max_length).token_id
        for shard in selected.shards.values()
        for d in shard
    ]
    num_tokens = sum(len(s) for s in seqs)
    teachers = {
        dtype: HFTeacher(
            model_path, vocab.boundary_class, dtype=dtype, device="cpu", token_budget=2048
        )
        for dtype in ("float32", "bfloat16")
    }
    times: dict[str, list[float]] = {d: [] for d in teachers}
    scores = {}
    for _ in range(args.rounds):
        for dtype, teacher in teachers.items():
            start = time.perf_counter()
            scores[dtype] = teacher.score(seqs)
            times[dtype].append(time.perf_counter() - start)
    d_logp = np.concatenate(
        [np.abs(b.logp[1:] - a.logp[1:]) for a, b in zip(scores["float32"], scores["bfloat16"])]
    )

    def default_set(bm: np.ndarray) -> np.ndarray:
        return np.logaddexp.reduce(bm.astype(np.float64), axis=1)

    d_blm = np.concatenate(
        [
            np.abs(default_set(b.boundary_logmass) - default_set(a.boundary_logmass))
            for a, b in zip(scores["float32"], scores["bfloat16"])
        ]
    )
    d_blm = d_blm[np.isfinite(d_blm)]
    fp32, bf16 = min(times["float32"]), min(times["bfloat16"])
    print(f"CPU bf16 support (lscpu): {', '.join(cpu_bf16_flags()) or 'none'}")
    print(
        f"teacher {model_path}: {len(seqs)} sequences, {num_tokens} tokens, best of {args.rounds}"
    )
    print(
        f"fp32 weights: {num_tokens / fp32:.0f} tokens/s; bf16 trunk + fp32 head: {num_tokens / bf16:.0f} tokens/s"
    )
    print(f"bf16 / fp32 throughput: {fp32 / bf16:.2f}x")
    print(f"|Δlogp| bf16 vs fp32: max {d_logp.max():.3f}, mean {d_logp.mean():.4f} nats")
    print(
        f"|Δ boundary log-mass (default set)|: max {d_blm.max():.3f}, mean {d_blm.mean():.4f} nats"
    )


if __name__ == "__main__":
    main()
