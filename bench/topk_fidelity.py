"""The top-k boundary fallback's error against the exact store (docs/vllm-fidelity.md), on CPU, without vLLM.

    .venv/bin/python bench/topk_fidelity.py                     # demo teacher, 64 stdlib docs, k = 8 20 64
    .venv/bin/python bench/topk_fidelity.py --hf-store runs/x/teacher_store --ks 8 20 64

1. `alm precompute` with the HF backend stores the exact `boundary_logmass` and the top-64 (`top_k: 64`).
2. For each k and bound, a second store is written through vLLM's conversion path
   (`alm.teacher.vllm_convert.boundary_logmass_from_topk` on the stored top-k, truncated to k): the same token ids
   and `logp`, the boundary log-mass replaced by the top-k bound, the method and k recorded in the plan. This is
   what `teacher.backend: vllm` with `boundary_method: topk_lower|topk_upper` and `num_logprobs: k` writes, up to
   the stored top-k log-probs being float16 (|error| <= 2^-11 relative) and vLLM's own kernels.
3. `alm inspect HF --compare DERIVED` (`compare_stores_stats`) gives max/mean |Δ| per class and for the default
   boundary set, and the γ-merge decisions that change. One line per figure, then a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def derive_topk_store(src_url: str, dst_url: str, k: int, bound: str) -> None:
    """Write `dst_url`: `src_url`'s sequences with `boundary_logmass` replaced by the top-k bound."""
    from alm.store import schema
    from alm.store.finalize import finalize_store
    from alm.store.reader import open_store
    from alm.store.writer import ShardWriter, StorePlan, prepare_store
    from alm.teacher.vllm_convert import boundary_logmass_from_topk

    src = open_store(src_url)
    plan = StorePlan.from_json(src.manifest.plan)
    if plan.top_k < k:
        raise SystemExit(f"{src_url} stores top-{plan.top_k}; need top_k >= {k}")
    derived = dataclasses.replace(
        plan,
        fields=schema.DEFAULT_FIELDS,
        top_k=0,
        boundary_method=f"topk_{bound}",
        boundary_top_k=k,
        settings={**dict(plan.settings), "derived_from": src_url},
    )
    layout = prepare_store(dst_url, derived, overwrite=True)
    layout.write_vocab(src.vocab_table)
    boundary_class = src.vocab_table.column("boundary_class").to_numpy()
    for j in src.shard_indices:
        shard = src.read_shard(j, ["token_id", "logp", "boundary_logmass", "topk_id", "topk_logp"])
        with ShardWriter(layout, j) as writer:
            for seq in shard.sequences():
                blm = boundary_logmass_from_topk(
                    seq.topk_id[:, :k],
                    seq.topk_logp[:, :k],
                    boundary_class,
                    bound,  # type: ignore[index]
                )
                writer.add(
                    seq_id=seq.seq_id,
                    text=seq.text,
                    token_id=seq.token_id,
                    logp=seq.logp,
                    boundary_logmass=blm,
                    segments=seq.segments,
                    loss_spans=seq.loss_spans,
                    truncated=seq.truncated,
                    doc_id=seq.doc_id,
                    source=seq.source,
                    row=seq.row,
                )
    finalize_store(layout)


def probability_errors(exact_url: str, bound_url: str) -> dict[str, float]:
    """|Δ| of the default boundary set's probability mass (well defined where a bound is −inf), per position."""
    import numpy as np

    from alm.store import schema
    from alm.store.reader import open_store

    def totals(url: str) -> np.ndarray:
        parts = [
            np.exp(s.arrays["boundary_logmass"].astype(np.float64))[
                :, list(schema.DEFAULT_BOUNDARY_CLASSES)
            ].sum(1)
            for s in open_store(url).iter_shards(["boundary_logmass"])
        ]
        return np.concatenate(parts)

    diff = np.abs(totals(exact_url) - totals(bound_url))
    return {"prob_max": float(diff.max()), "prob_mean": float(diff.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-store", default=None, help="an exact HF store with top_k >= max(ks)")
    parser.add_argument("--recipe", default=str(REPO / "stages/demo_precompute.yaml"))
    parser.add_argument("--limit", type=int, default=64, help="documents, when precomputing here")
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--out", default=str(REPO / "runs/vllm_fidelity"))
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 20, 64])
    parser.add_argument(
        "--bounds", nargs="+", default=["lower", "upper"], choices=["lower", "upper"]
    )
    args = parser.parse_args()

    from alm.store.inspect import compare_stores, compare_stores_stats, inspect_stats

    out = Path(args.out)
    hf_store = args.hf_store or str(out / "hf_top64")
    if args.hf_store is None:
        start = time.perf_counter()
        subprocess.run(
            [
                str(REPO / ".venv/bin/alm"),
                "precompute",
                args.recipe,
                "--set",
                f"top_k={max(args.ks)}",
                "--set",
                f"data.limit={args.limit}",
                "--set",
                f"max_length={args.max_length}",
                "--set",
                f"output={hf_store}",
                "--overwrite",
            ],
            check=True,
        )
        print(f"hf precompute (top-{max(args.ks)}): {time.perf_counter() - start:.1f} s")
    info = inspect_stats(hf_store)
    print(
        f"hf store: {info['num_sequences']} sequences, {info['num_tokens']} tokens, "
        f"teacher bits/byte {info['teacher_bits_per_byte']:.4f}, "
        f"positions with default-set mass > 0.1: {info['boundary_total_frac_above_gamma']:.4f}"
    )
    rows = []
    for k in args.ks:
        for bound in args.bounds:
            dst = str(out / f"topk_{bound}_{k}")
            derive_topk_store(hf_store, dst, k, bound)
            stats = compare_stores_stats(hf_store, dst)
            report = compare_stores(hf_store, dst)
            print(report)
            d = stats["boundary_logmass"]["default_set"]
            rows.append(
                {
                    **probability_errors(hf_store, dst),
                    "k": k,
                    "bound": bound,
                    "default_max": d["max"],
                    "default_mean": d["mean"],
                    "default_finite_mismatch": d["num_finite_mismatch"],
                    "class_max": {n: v["max"] for n, v in stats["boundary_logmass"].items()},
                    "class_mean": {n: v["mean"] for n, v in stats["boundary_logmass"].items()},
                    "class_finite_mismatch": {
                        n: v["num_finite_mismatch"] for n, v in stats["boundary_logmass"].items()
                    },
                    "merge_differ": stats["merge_decisions_differ"],
                    "positions": stats["num_positions"],
                    "logp_max": stats["logp"]["max"],
                }
            )
    (out / "fidelity.json").write_text(json.dumps(rows, indent=2))
    print()
    print(
        "| k | bound | max abs diff logmass | mean abs diff logmass | finite in one store only "
        "| max abs diff prob | mean abs diff prob | merge decisions changed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['k']} | {r['bound']} | {r['default_max']:.3f} | {r['default_mean']:.4f} "
            f"| {r['default_finite_mismatch']} | {r['prob_max']:.4f} | {r['prob_mean']:.5f} "
            f"| {r['merge_differ']} of {r['positions']} ({r['merge_differ'] / r['positions']:.2%}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
