"""Resumable checkpoints: model, optimizer, scheduler, RNG states and the data position.

A checkpoint is `OUTPUT/checkpoints/step-NNNNNNNN/state.pt` (one `torch.save` dict), written under a temporary
folder name and renamed when complete, so a killed run never leaves a half-written checkpoint behind. The data
position is the optimizer step: the loader's batches are a pure function of (seed, step), so restoring the step,
the RNG states and the optimizer gives a run that continues bit for bit on CPU (STYLE.md §4).

Never imports `torch.distributed`: the loop saves on the main process only, with full (unsharded) model and
optimizer state dicts from `alm.train.parallel`, and loads them back through `parallel.load_full_state`. Under
FSDP2 the optimizer state is keyed by parameter name (DCP's full state dict, gathered onto rank 0); on one process
and under DDP it is `optimizer.state_dict()`, keyed by parameter index.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alm.config.train import TrainRecipe
from alm.train import parallel

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) random states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    keep_every_steps: int | None = None,
    keep_every_minutes: float | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` checkpoints.

    Args:
        output_dir: the run folder.
        step: optimizer steps done (the data position to continue from).
        model_state: the full model state dict (`parallel.full_state_dict`).
        optimizer_state: the full optimizer state dict (`parallel.full_optimizer_state_dict`).
        scheduler: the learning-rate scheduler.
        config_hash: the recipe's hash.
        extra: anything else to keep.
        keep: how many checkpoints to keep, newest first.
        keep_every_steps, keep_every_minutes: older ones also kept (`retained_checkpoints`).

    Returns:
        the checkpoint folder.
    """
    root = output_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    payload = {
        "step": step,
        "config_hash": config_hash,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    torch.save(payload, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    checkpoints = list_checkpoints(output_dir)
    kept = retained_checkpoints(
        [(_step_of(p), (p / "state.pt").stat().st_mtime) for p in checkpoints],
        keep=keep,
        every_steps=keep_every_steps,
        every_minutes=keep_every_minutes,
    )
    for old in checkpoints:
        if _step_of(old) not in kept:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint saved: %s", final)
    return final


def retained_checkpoints(
    checkpoints: list[tuple[int, float]],
    *,
    keep: int,
    every_steps: int | None = None,
    every_minutes: float | None = None,
) -> set[int]:
    """The steps of the checkpoints to keep (`keep_checkpoints`, `keep_checkpoint_every_*`; orbax's rules).

    Args:
        checkpoints: `(step, saved_at)` of every finished checkpoint, `saved_at` in seconds (file mtime).
        keep: the newest `keep` are kept (transformers' `save_total_limit`).
        every_steps: also keep every checkpoint whose step is a multiple of this.
        every_minutes: also keep, oldest first, each checkpoint saved at least this many minutes after the
            previous one kept by this rule (the oldest is kept).

    Returns:
        the steps to keep.
    """
    ordered = sorted(checkpoints)
    kept = {step for step, _ in ordered[-keep:]} if keep > 0 else set()
    if every_steps:
        kept |= {step for step, _ in ordered if step % every_steps == 0}
    if every_minutes:
        last_kept_at: float | None = None
        for step, saved_at in ordered:
            if last_kept_at is None or saved_at - last_kept_at >= every_minutes * 60:
                kept.add(step)
                last_kept_at = saved_at
    return kept


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.pt").is_file()
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (on CPU)."""
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def restore_checkpoint(state: dict[str, Any], scheduler: Any) -> int:
    """Load the scheduler and RNG states from `state`; return the step to continue from.

    Model and optimizer states go through `parallel.load_full_state`, which knows how they are sharded.
    """
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def save_run_checkpoint(
    output_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainRecipe,
    config_hash: str,
) -> None:
    """Every process: gather the full model and optimizer states (a collective under FSDP2); the main process
    writes the checkpoint of `step`; then all wait for it."""
    model_state = parallel.full_state_dict(model)
    optimizer_state = parallel.full_optimizer_state_dict(model, optimizer)
    if parallel.is_main():
        save_checkpoint(
            output_dir,
            step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler=scheduler,
            config_hash=config_hash,
            keep=cfg.keep_checkpoints,
            keep_every_steps=cfg.keep_checkpoint_every_steps,
            keep_every_minutes=cfg.keep_checkpoint_every_minutes,
        )
    parallel.barrier()
