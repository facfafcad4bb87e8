"""GPU performance check (`just gpu-check`, issue 11 target 4): models from real configurations, random weights.

    .venv/bin/python bench/gpu_perf.py                 # on a CUDA machine: the figures below, a few minutes
    .venv/bin/python bench/gpu_perf.py --tiny          # CPU smoke run of the same code (tests/bench/test_gpu_perf.py)

Nothing is downloaded: the teacher and the student are built in-process from configurations written here with
the shapes of public models (Llama-3.2-1B as the teacher, TinyLlama-1.1B as the ~1B student), with random weights.
One line per figure:

1. HF-backend precompute (`HFTeacher.score`: bf16 trunk, packed rows, fp32 LM head, log-probs and boundary
   log-mass) in teacher tokens/s, as model FLOP/s (`2 x linear parameters x tokens / s`, head included, attention
   FLOPs left out) and as a fraction of the GPU's peak dense bf16 rate (target >= 0.5), and against a bare forward
   (`model(input_ids, position_ids).logits`, bf16 head) over the same packed rows;
2. one ALM training step (forward, `alm_loss`, backward, AdamW) of the ~1B student, bf16 autocast, as model FLOP
   utilisation (`6 x parameters x tokens / s / peak`, target >= 0.4) and as a ratio to an SFT (cross-entropy) step
   on the same batch (target <= 1.10).

Each timing is the best of `--repeat` after a warm-up. `--tiny` swaps in two-layer models and runs on CPU, where
there is no peak to compare with (those figures print as n/a); it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import peak_tflops  # noqa: E402

# Shapes of public models (their config.json), so the kernels see realistic sizes.
TEACHER_LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
STUDENT_TINYLLAMA_1_1B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def build_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def linear_params(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def best_of(fn: Any, repeat: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def random_sequences(
    rng: np.random.Generator, vocab: int, num: int, max_len: int
) -> list[np.ndarray]:
    lengths = np.clip(rng.lognormal(np.log(max_len / 3), 0.8, num), 8, max_len).astype(int)
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def check_precompute(args: argparse.Namespace, device: torch.device, peak: float | None) -> None:
    import tempfile

    from alm.teacher.base import packed_layout
    from alm.teacher.hf import HFTeacher

    shape = TINY if args.tiny else TEACHER_LLAMA_3_2_1B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(shape, dtype, device)
    with tempfile.TemporaryDirectory(prefix="alm-gpu-perf-") as folder:
        model.save_pretrained(folder)
        boundary_class = (
            np.random.default_rng(0).integers(-1, 5, shape["vocab_size"]).astype(np.int8)
        )
        teacher = HFTeacher(
            folder,
            boundary_class,
            dtype="float32" if args.tiny else "bfloat16",
            device=str(device),
            token_budget=args.token_budget,
            row_chunk=args.row_chunk,
        )
    rng = np.random.default_rng(1)
    seqs = random_sequences(rng, shape["vocab_size"], args.sequences, args.max_length)
    num_tokens = sum(len(s) for s in seqs)
    t_alm = best_of(lambda: teacher.score(seqs), args.repeat, device)
    layout = packed_layout([len(s) for s in seqs], args.token_budget)

    @torch.inference_mode()
    def bare() -> None:
        for rows in layout:
            input_ids, position_ids, _ = teacher._packed_inputs(
                [[seqs[i] for i in row] for row in rows]
            )
            teacher.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits  # noqa: B018

    t_bare = best_of(bare, args.repeat, device)
    flops_per_token = 2 * linear_params(teacher.model)
    rate = flops_per_token * num_tokens / t_alm
    frac = f"{rate / (peak * 1e12):.2f}" if peak else "n/a"
    print(
        f"teacher {'tiny' if args.tiny else 'Llama-3.2-1B shape'}: {num_tokens} tokens, packed, pack={teacher.pack}"
    )
    print(f"precompute (HF backend): {num_tokens / t_alm:,.0f} tokens/s, {rate / 1e12:.1f} TFLOP/s")
    print(f"precompute / peak bf16 FLOP rate: {frac} (target >= 0.5)")
    print(f"precompute / bare forward on the same packed rows: {t_bare / t_alm:.2f}x")


def check_train_step(args: argparse.Namespace, device: torch.device, peak: float | None) -> None:
    from alm.align.targets import build_alm_targets
    from alm.losses.alm import alm_loss
    from alm.losses.batch import pad_targets
    from alm.losses.sft import sft_loss

    shape = TINY if args.tiny else STUDENT_TINYLLAMA_1_1B
    model = build_model(shape, torch.float32, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rng = np.random.default_rng(2)
    batch, length = args.micro_batch, args.train_length
    input_ids = torch.as_tensor(
        rng.integers(0, shape["vocab_size"], (batch, length)), device=device
    )
    boundary_mask = torch.as_tensor(rng.random(shape["vocab_size"]) < 0.3, device=device)
    targets = pad_targets([synthetic_targets(rng, length, build_alm_targets) for _ in range(batch)])
    targets = targets.to(device)
    sft_mask = torch.ones((batch, length), dtype=torch.bool, device=device)
    sft_mask[:, 0] = False
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(kind: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=input_ids, use_cache=False).logits
        if kind == "alm":
            loss = alm_loss(logits, input_ids, boundary_mask, targets).loss
        else:
            loss = sft_loss(logits, input_ids, sft_mask)
        loss.backward()
        optimizer.step()

    t_sft = best_of(lambda: step("sft"), args.repeat, device)
    t_alm = best_of(lambda: step("alm"), args.repeat, device)
    params = sum(p.numel() for p in model.parameters())
    tokens = batch * length
    mfu = f"{6 * params * tokens / t_alm / (peak * 1e12):.2f}" if peak else "n/a"
    print(
        f"student {'tiny' if args.tiny else 'TinyLlama-1.1B shape'}: {params / 1e9:.2f}B parameters, {batch} x {length} tokens"
    )
    print(
        f"ALM step: {t_alm * 1e3:.1f} ms, {tokens / t_alm:,.0f} tokens/s, MFU {mfu} (target >= 0.4)"
    )
    print(f"ALM step / SFT step: {t_alm / t_sft:.3f}x (target <= 1.10)")


def synthetic_targets(rng: np.random.Generator, length: int, build: Any) -> Any:
    """ALM targets for one student sequence aligned 1:1 in chunks of 1-4 tokens with a synthetic teacher."""
    from alm.align.chunks import Chunks

    bounds = np.cumsum(rng.integers(1, 5, length))
    bounds = np.concatenate([[1], bounds[bounds < length]])
    start, end = bounds[:-1], bounds[1:]
    chunks = Chunks(
        teacher_start=start,
        teacher_end=end,
        student_start=start,
        student_end=end,
        start_byte=start,
        end_byte=end,
        is_block=np.zeros(len(start), dtype=bool),
        in_loss=np.ones(len(start), dtype=bool),
    )
    logp = -rng.exponential(1.0, length)
    logmass = np.log(rng.random(length))
    return build(chunks, logp, logmass, gamma=0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="two-layer models on CPU (a smoke run)")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--token-budget", type=int, default=32768)
    parser.add_argument("--row-chunk", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--train-length", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    if args.tiny:
        args.sequences, args.max_length, args.token_budget = 12, 64, 256
        args.row_chunk, args.micro_batch, args.train_length, args.repeat = 64, 2, 64, 1
        device = torch.device("cpu")
        peak = None
    elif not torch.cuda.is_available():
        print("gpu_perf: no CUDA device on this machine; run with --tiny for a CPU smoke run")
        return 2
    else:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or peak_tflops(name)
        print(f"device: {name}, peak dense bf16 {peak} TFLOP/s")
    check_precompute(args, device, peak)
    check_train_step(args, device, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
