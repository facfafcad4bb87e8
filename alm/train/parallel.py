"""Processes and devices: the only module that imports `torch.distributed`.

One code path for 1 and N processes: `init()` reads the torchrun environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`); without it everything is a single process and `wrap(model)` is the identity. Under torchrun the
backend is gloo on CPU and nccl on GPU; `wrap` applies DDP, or FSDP2 `fully_shard` per transformer block when the
recipe says `parallel: fsdp2` (the last block stays unsharded between its forward and backward, so GradMag can
measure its gradients).

Gradients: DDP and FSDP2 *average* gradients over ranks. The ALM/SFT losses are already normalised by global counts
(ALM_SPEC §6.3), so the loop multiplies each micro-batch loss by `world_size()` to turn that average into a sum.

Checkpoints: `full_state_dict` and `full_optimizer_state_dict` gather FSDP2 shards onto rank 0's CPU (DCP's full
state dicts), and `load_full_state` gives each rank its shards back, so resume is exact under DDP and FSDP2 alike.

    torchrun --nproc-per-node 2 -m alm.cli train stages/demo_train.yaml   # 2 CPU processes, gloo
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from alm.errors import AlmError, ConfigError
from alm.losses.gradmag import transformer_blocks


def init() -> torch.device:
    """Join the process group if launched by torchrun; return this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown() -> None:
    """Leave the process group (no-op on one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes logs, checkpoints and the final student."""
    return rank() == 0


def barrier() -> None:
    """Wait for all processes (no-op on one process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum `value` over all processes (returns a new tensor; identity on one process)."""
    out = value.clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


T = TypeVar("T")


class MainProcessFailedError(AlmError):
    """Rank 0 failed at a step only it performs; raised on the other ranks, naming rank 0's error."""


def on_main(action: Callable[[], T], what: str) -> T | None:
    """Run `action` on rank 0 only and make every rank learn whether it failed.

    A failure on rank 0 alone (a run folder it cannot prepare, a run lock another invocation holds) must not leave
    the other ranks waiting at their next collective for a rank 0 that has gone: the outcome is broadcast, rank 0
    re-raises its own error and every other rank raises `MainProcessFailedError` naming it. On one process this is
    `action()`.

    Returns:
        `action()`'s result on rank 0; None on the other ranks.

    Raises:
        whatever `action` raised, on rank 0; MainProcessFailedError on the others.
    """
    if not dist.is_initialized():
        return action()
    result: T | None = None
    error: BaseException | None = None
    if is_main():
        try:
            result = action()
        except BaseException as err:  # re-raised below, once the other ranks know
            error = err
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise MainProcessFailedError(f"rank 0 failed to {what}, so this rank stops too: {message}")
    return result


def wrap(model: nn.Module, mode: Literal["ddp", "fsdp2"], device: torch.device) -> nn.Module:
    """Prepare `model` for data-parallel training: identity on one process, DDP or FSDP2 under torchrun."""
    model.to(device)
    if not dist.is_initialized() or world_size() == 1:
        return model
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        blocks = list(transformer_blocks(model))
        for index, block in enumerate(blocks):
            # The last block keeps its unsharded parameters from the forward to the backward (which starts there
            # anyway), so GradMag's `autograd.grad` sees the tensors the forward used, not sharded copies.
            fully_shard(block, reshard_after_forward=index < len(blocks) - 1)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(model, "no_sync") else model


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for a micro-batch that is not the step's last (when `skip`)."""
    model_no_sync = getattr(model, "no_sync", None)
    if skip and model_no_sync is not None:
        with model_no_sync():
            yield
    else:
        yield


def _is_sharded(model: nn.Module) -> bool:
    return dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict for checkpoints and the final save.

    Under FSDP2 this is a collective (every rank calls it) and only rank 0 receives the tensors.
    """
    inner = unwrap(model)
    if _is_sharded(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict=True: plain (unsharded) tensors, though the signature admits DTensors
        return cast(
            dict[str, torch.Tensor],
            get_model_state_dict(
                inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            ),
        )
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state for a checkpoint.

    Under FSDP2: every rank's shards gathered onto rank 0's CPU, keyed by parameter name (a collective; the
    other ranks receive `{}`). Otherwise `optimizer.state_dict()`, as every rank holds all of it.
    """
    inner = unwrap(model)
    if _is_sharded(inner):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            inner, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full state dicts written from `full_state_dict` and `full_optimizer_state_dict`.

    Every rank passes the whole checkpoint; under FSDP2 each keeps only its own shards (a collective).

    Raises:
        ConfigError: an FSDP2 run on several processes is given a checkpoint of a DDP or one-process run.
    """
    inner = unwrap(model)
    if not _is_sharded(inner):
        inner.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    if any(isinstance(key, int) for key in optimizer_state["state"]):
        raise ConfigError(
            "this checkpoint was written by a parallel: ddp (or one-process) run, whose optimizer state is keyed "
            "by parameter index; resume it with parallel: ddp, or start a new run"
        )
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        ValueType,
        set_state_dict,
    )

    set_state_dict(
        inner,
        optimizer,
        model_state_dict=cast(dict[str, ValueType], model_state),  # Tensor is a ValueType
        optim_state_dict=optimizer_state,
        options=StateDictOptions(full_state_dict=True),
    )
