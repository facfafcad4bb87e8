"""Peak memory of the ALM loss against cross-entropy on the same logits (DESIGN.md target ≤ 1.10×), and the loss's
own time against the student's forward/backward.

    .venv/bin/python bench/bench_loss.py [--rows 1024] [--vocab 131072] [--group-tokens 3] [--dtype bfloat16]

Memory: each variant runs forward + backward on the same fp32 logits [rows, vocab] (a leaf that requires grad,
like the LM head's output):

- `ce`: `F.cross_entropy(logits, ids)` (what an SFT step does);
- `alm`: `alm.losses.alm.alm_loss` with groups of `--group-tokens` student tokens over every position.

On CUDA, peak = `torch.cuda.max_memory_allocated()`. On CPU, each variant runs in a fresh subprocess and peak =
the process's peak resident set (`VmHWM`) minus its resident set just before the logits were created, so the
figure counts the logits, the loss's working set and the logits' gradient. Prints the ratio alm / ce of that peak
(target ≤ 1.10×) and of the memory beyond the logits.

Time: a small Llama student (hidden 256, 4 layers, vocab 32k, 2 × 512 tokens): best-of-3 time of the model's
forward + backward with cross-entropy, against the time of the ALM loss's own forward + backward on the same
logits. Prints the ratio (loss time / student forward-backward time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from torch.nn import functional

from alm.align.targets import AlmTargets
from alm.losses.alm import alm_loss
from alm.losses.batch import PaddedTargets, pad_targets


def make_targets(batch: int, length: int, group_tokens: int) -> PaddedTargets:
    """Groups of `group_tokens` student tokens covering positions 1.. of every row."""
    examples = []
    for _ in range(batch):
        start = np.arange(1, length - group_tokens + 1, group_tokens, dtype=np.int64)
        end = start + group_tokens
        examples.append(
            AlmTargets(
                teacher_group_logp=np.full(len(start), -2.0, np.float32),
                teacher_group_start=start,
                teacher_group_end=end,
                student_group_start=start,
                student_group_end=end,
                teacher_group_last_pos=end - 1,
                student_group_last_pos=end - 1,
                teacher_chunk_last_pos=end - 1,
                student_chunk_last_pos=end - 1,
                group_has_boundary_term=np.ones(len(start), bool),
            )
        )
    return pad_targets(examples)


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(
    variant: str, rows: int, vocab: int, group_tokens: int, device: str, dtype: str = "float32"
) -> dict[str, float]:
    torch.manual_seed(0)
    batch = 1
    ids = torch.randint(0, vocab, (batch, rows), device=device)
    boundary_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    boundary_mask[: vocab // 8] = True
    targets = make_targets(batch, rows, group_tokens).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resident_kib("VmRSS") * 1024
    logits = torch.randn(
        batch, rows, vocab, device=device, dtype=getattr(torch, dtype)
    ).requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()
    start = time.perf_counter()
    if variant == "ce":
        loss = functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    else:
        loss = alm_loss(logits, ids, boundary_mask, targets).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resident_kib("VmHWM") * 1024 - before
    return {
        "peak": float(peak),
        "logits": float(logits_bytes),
        "seconds": time.perf_counter() - start,
    }


def memory_figures(args: argparse.Namespace, device: str) -> None:
    results = {}
    for variant in ("ce", "alm"):
        if device == "cuda":
            run_variant(variant, 64, 1024, args.group_tokens, device)  # warm up kernels
            results[variant] = run_variant(
                variant, args.rows, args.vocab, args.group_tokens, device
            )
        else:
            command = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--rows",
                str(args.rows),
                "--vocab",
                str(args.vocab),
                "--group-tokens",
                str(args.group_tokens),
                "--dtype",
                args.dtype,
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(output.strip().splitlines()[-1])
    ce, alm = results["ce"], results["alm"]
    mib = 2**20
    print(
        f"peak memory ALM loss vs cross-entropy, same {args.dtype} logits [{args.rows}, {args.vocab}] on {device}: "
        f"{alm['peak'] / ce['peak']:.2f}x  (alm {alm['peak'] / mib:.0f} MiB, ce {ce['peak'] / mib:.0f} MiB, "
        f"logits {ce['logits'] / mib:.0f} MiB; target <= 1.10x)"
    )
    print(
        f"memory beyond the logits, ALM vs cross-entropy: "
        f"{(alm['peak'] - alm['logits']) / max(ce['peak'] - ce['logits'], 1):.2f}x  "
        f"(alm {(alm['peak'] - alm['logits']) / mib:.0f} MiB, ce {(ce['peak'] - ce['logits']) / mib:.0f} MiB)"
    )


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def time_figures(device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, batch, length = 32768, 2, 512
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, vocab, (batch, length), device=device)
    boundary_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    boundary_mask[: vocab // 8] = True
    targets = make_targets(batch, length, 3).to(device)

    def student_step() -> None:
        logits = model(ids).logits
        functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
        ).backward()

    logits = model(ids).logits.detach().requires_grad_()

    def alm_step() -> None:
        alm_loss(logits, ids, boundary_mask, targets).loss.backward()

    def ce_step() -> None:
        functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)
        ).backward()

    student_s = best_of(3, student_step)
    alm_s = best_of(3, alm_step)
    ce_s = best_of(3, ce_step)
    print(
        f"ALM loss time vs student forward+backward (Llama h256 x4, vocab {vocab}, {batch}x{length} tokens, "
        f"{device}): {alm_s / student_s:.2f}x  (loss {alm_s * 1e3:.0f} ms, student {student_s * 1e3:.0f} ms, "
        f"cross-entropy alone {ce_s * 1e3:.0f} ms = {ce_s / student_s:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--group-tokens", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-time", action="store_true", help="only the memory figures")
    parser.add_argument("--child", choices=["ce", "alm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(
            json.dumps(
                run_variant(
                    args.child, args.rows, args.vocab, args.group_tokens, device, args.dtype
                )
            )
        )
        return
    memory_figures(args, device)
    if not args.skip_time:
        time_figures(device)


if __name__ == "__main__":
    main()
