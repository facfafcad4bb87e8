"""Benchmark: `alm precompute` (HF backend) against a bare teacher forward loop on the same packed rows.

    .venv/bin/python bench/bench_precompute.py                      # the embedded SmolLM2-135M teacher, ~2-4 min
    .venv/bin/python bench/bench_precompute.py --docs 16 --rounds 1  # quicker, noisier

Both sides run the same documents, rendered the same way and laid out in the same forward passes: several
sequences per row, exactly as the HF backend packs them (`packed_layout` of each batch `alm precompute` plans per
shard; position ids restart per sequence). The bare loop only calls `model(input_ids, position_ids).logits`;
`alm precompute` also computes fp32 log-probs, boundary log-mass, writes the store and shows progress. Rounds
alternate the two and the best time of each is kept, so load from other processes mostly cancels. Prints one line
per figure:

- the padded fraction of the computed positions, one sequence per row (the layout before packing) and packed;
- throughput ratio (target >= 0.95x), by wall clock and by this process's CPU time (the machine may be shared;
  CPU time is less sensitive to other processes);
- bytes per teacher token on disk of the default fields (token_id, logp, boundary_logmass), plus the
  shards including the index with the text (the vocabulary and tokenizer files are a fixed few MB per store).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alm.config.precompute import load_precompute_recipe  # noqa: E402
from alm.precompute import load_documents, run_precompute  # noqa: E402
from alm.teacher.base import (  # noqa: E402
    packed_layout,
    padded_fraction,
    plan_batches,
    plan_padded_batches,
)
from alm.teacher.default import resolve_teacher_path  # noqa: E402
from alm.teacher.hf import load_tokenizer  # noqa: E402
from alm.templates import render, resolve_family  # noqa: E402
from alm.vocab import vocab_from_tokenizer  # noqa: E402

DEFAULT_FIELDS = ("token_id", "logp", "boundary_logmass")


def same_batches(
    recipe_path: Path, overrides: list[str]
) -> tuple[list[list[list[np.ndarray]]], str, tuple[float, float]]:
    """The forward passes `alm precompute` runs for this recipe, as rows of token-id arrays; the model path; and
    the padded fraction one sequence per row (before packing) and packed."""
    recipe = load_precompute_recipe(recipe_path, overrides)
    selected = load_documents(recipe, recipe_path)
    model_path = resolve_teacher_path(recipe.teacher.model)
    tokenizer = load_tokenizer(model_path)
    vocab = vocab_from_tokenizer(tokenizer)
    family = resolve_family(recipe.teacher.family, tokenizer)
    passes, padded_layouts, packed_layouts, all_lengths = [], [], [], []
    for shard_index in sorted(selected.shards):
        seqs = [
            render(d, tokenizer, vocab, family, max_length=recipe.max_length).token_id
            for d in selected.shards[shard_index]
        ]
        lengths = [len(s) for s in seqs]
        offset = len(all_lengths)
        all_lengths += lengths
        padded_layouts += [
            [[offset + i] for i in b] for b in plan_padded_batches(lengths, recipe.token_budget)
        ]
        for batch in plan_batches(lengths, recipe.token_budget):  # precompute's call, per shard
            # the HF backend's layout of that call
            for rows in packed_layout([lengths[i] for i in batch], recipe.token_budget):
                rows = [[batch[i] for i in row] for row in rows]
                packed_layouts.append([[offset + i for i in row] for row in rows])
                passes.append([[seqs[i] for i in row] for row in rows])
    fractions = (
        padded_fraction(padded_layouts, all_lengths),
        padded_fraction(packed_layouts, all_lengths),
    )
    return passes, model_path, fractions


@torch.inference_mode()
def bare_forward(
    model: torch.nn.Module, passes: list[list[list[np.ndarray]]]
) -> tuple[float, float]:
    """(wall s, CPU s) of `model(input_ids, position_ids).logits` over the packed forward passes."""
    started, started_cpu = time.perf_counter(), time.process_time()
    for rows in passes:
        width = max(sum(len(s) for s in row) for row in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for ids in row:
                input_ids[r, offset : offset + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                position_ids[r, offset : offset + len(ids)] = torch.arange(len(ids))
                offset += len(ids)
            position_ids[r, offset:] = torch.arange(width - offset)
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # noqa: B018
    return time.perf_counter() - started, time.process_time() - started_cpu


def precompute_seconds(
    recipe_path: Path, overrides: list[str], out: Path
) -> tuple[float, float, int]:
    """Run `alm precompute` into `out`: (wall s, CPU s, tokens) of the tokenizer check, rendering, scoring and
    writing (its own timer; model loading excluded)."""
    stats: dict[str, float] = {}
    run_precompute(recipe_path, overrides=[*overrides, f"output={out}"], stats=stats)
    return stats["seconds"], stats["cpu_seconds"], int(stats["num_tokens"])


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "stages" / "demo_precompute.yaml")
    parser.add_argument("--docs", type=int, default=48, help="documents to score")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = [
        f"data.limit={args.docs}",
        f"max_length={args.max_length}",
        "teacher.device=cpu",
        "shard_size=16",
    ]
    batches, model_path, (padded_before, padded_after) = same_batches(args.recipe, overrides)
    num_tokens = sum(len(s) for rows in batches for row in rows for s in row)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    # warm-up on a shape not measured (alm's teacher has had its own small probe forward at load time)
    bare_forward(model, [[[np.arange(1, 9, dtype=np.int32)]]])
    bare_times, alm_times = [], []
    with tempfile.TemporaryDirectory(prefix="alm-bench-") as tmp:
        for r in range(args.rounds):
            bare_times.append(bare_forward(model, batches))
            seconds, cpu_seconds, tokens = precompute_seconds(
                args.recipe, overrides, Path(tmp) / f"s{r}"
            )
            assert tokens == num_tokens, (tokens, num_tokens)
            alm_times.append((seconds, cpu_seconds))
        store = Path(tmp) / "s0"
        arrays = [
            p
            for p in store.rglob("*")
            if p.is_file() and any(f"/{f}/" in str(p) for f in DEFAULT_FIELDS)
        ]
        field_bytes = sum(p.stat().st_size for p in arrays)
        chunk_bytes = sum(p.stat().st_size for p in arrays if p.name != "zarr.json")
        num_shards = len(list((store / "shards").iterdir()))
        shard_bytes = disk_bytes(store / "shards")
    bare, alm = min(t[0] for t in bare_times), min(t[0] for t in alm_times)
    bare_cpu, alm_cpu = min(t[1] for t in bare_times), min(t[1] for t in alm_times)
    print(
        f"teacher: {model_path}, {len(batches)} batches, {num_tokens} tokens, best of {args.rounds}"
    )
    print(
        f"padded fraction of the computed positions: {padded_before:.3f} one sequence per row (before), "
        f"{padded_after:.3f} packed (now)"
    )
    print(
        f"bare forward loop (same packed rows): {num_tokens / bare:.0f} tokens/s "
        f"({num_tokens / bare_cpu:.0f}/CPU s)"
    )
    print(
        f"alm precompute (hf): {num_tokens / alm:.0f} tokens/s ({num_tokens / alm_cpu:.0f}/CPU s)"
    )
    print(f"precompute / bare forward throughput, wall clock: {bare / alm:.3f}x (target >= 0.95x)")
    print(
        f"precompute / bare forward throughput, CPU time: {bare_cpu / alm_cpu:.3f}x (robust to other load)"
    )
    print(f"default fields on disk, array data: {chunk_bytes / num_tokens:.1f} bytes/token")
    print(
        f"default fields on disk with their metadata: {field_bytes / num_tokens:.1f} bytes/token "
        f"({num_shards} shards of ~{num_tokens // num_shards} tokens)"
    )
    print(
        f"all shards on disk (arrays + index with the text): {shard_bytes / num_tokens:.1f} bytes/token"
    )


if __name__ == "__main__":
    main()
