"""GradMag: combine several losses by the magnitude of their gradients (ALM_SPEC.md §7.3,
`approx_gradmag_preserve_mag`).

Owns `transformer_blocks`, `last_block`, `last_block_parameters` and `gradmag_combine`. For each loss L_i, G_i is its gradient w.r.t. the
trainable parameters of the last transformer block (the LoRA A/B there in LoRA mode); `w_i = 1 / (‖G_i‖₂ + 1e-8)`,
detached; the total is `Σ w_i L_i / Σ w_i`. Cost: one extra backward through the last block per loss.

Data parallel: each process holds the gradient of its own share of the micro-batch (the losses are normalised by
global counts, so the shares add up to the one-process gradient). `gradmag_combine` therefore sums the last-block
gradients over processes (`all_reduce_sum`, one collective for all losses) before taking norms, so the weights are
those of the *global* micro-batch, identical on every rank and to a one-process run. A loss that should have a
gradient and gets none (a parameter outside the graph, e.g. a sharded copy under FSDP2) is an error, never a silent
fallback. Must not import `alm.config` or `torch.distributed` (the reduction comes in as a function).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from alm.errors import AlmError


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its longest `nn.ModuleList` (`model.layers` in Llama/Qwen, `transformer.h`
    in GPT-2, also under a peft or DDP wrapper). FSDP2 shards these one by one (`alm.train.parallel.wrap`).

    Raises:
        AlmError: the model has no list of blocks.
    """
    blocks = max(
        (module for module in model.modules() if isinstance(module, nn.ModuleList)),
        key=len,
        default=None,
    )
    if blocks is None or len(blocks) == 0:
        raise AlmError(
            f"{type(model).__name__} has no list of transformer blocks; GradMag and FSDP2 need one."
        )
    return blocks


def last_block(model: nn.Module) -> nn.Module:
    """The model's last transformer block (GradMag's reference block, §7.3).

    Raises:
        AlmError: the model has no list of blocks.
    """
    return transformer_blocks(model)[-1]


def last_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the model's last transformer block (read them after the forward under FSDP2, when
    the block holds its unsharded parameters).

    Raises:
        AlmError: no block list, or the last block has no trainable parameter (then GradMag cannot weigh the losses:
            make the last block trainable, or in LoRA mode make LoRA cover it).
    """
    parameters = [p for p in last_block(model).parameters() if p.requires_grad]
    if not parameters:
        raise AlmError(
            "the last transformer block has no trainable parameter, so GradMag cannot measure gradients; train it "
            "(LoRA must cover the last block) or set the loss combination to a plain sum."
        )
    return parameters


def gradmag_combine(
    losses: Mapping[str, torch.Tensor],
    parameters: Sequence[torch.Tensor],
    *,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    preserve_magnitude: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weight each loss by the inverse norm of its last-block gradient over the global micro-batch.

    Args:
        losses: name → scalar loss; each must depend on every tensor of `parameters` through the graph.
        parameters: the last block's trainable parameters as used by this forward (`last_block_parameters`).
        all_reduce_sum: sums a tensor over data-parallel processes (`alm.train.parallel.all_reduce_sum`); None on
            one process.
        preserve_magnitude: divide by Σ w_i (the paper's default); False gives `approx_gradmag`.

    Returns:
        `(total, weights)`: the scalar to backpropagate and the detached fp32 scalar weights by name. A loss whose
        global gradient is exactly zero (no ALM group, or no SFT token, in the whole global micro-batch) gets weight
        0; when every loss has a zero gradient the total is `0 · Σ L_i` (the micro-batch teaches nothing).

    Raises:
        AlmError: a loss does not require a gradient, or some parameter gets no gradient from it.
    """
    if not parameters:
        raise AlmError("GradMag got no parameters to measure gradients on")
    flat_grads = []
    for name, loss in losses.items():
        if not loss.requires_grad:
            raise AlmError(
                f"GradMag: loss {name!r} does not depend on the model (it needs no gradient); a loss in the "
                "combination must be computed from the student's outputs"
            )
        grads = torch.autograd.grad(loss, list(parameters), retain_graph=True, allow_unused=True)
        missing = sum(grad is None for grad in grads)
        if missing:
            raise AlmError(
                f"GradMag: loss {name!r} gives no gradient to {missing} of the {len(grads)} last-block parameters; "
                "they are not the tensors this forward used (under FSDP2 the last block must stay unsharded "
                "after the forward, `alm.train.parallel.wrap` does that)"
            )
        flat_grads.append(torch.cat([cast(torch.Tensor, g).float().reshape(-1) for g in grads]))
    stacked = torch.stack(flat_grads)  # [num_losses, num_last_block_values]
    if all_reduce_sum is not None:
        stacked = all_reduce_sum(stacked)  # the global micro-batch's gradients
    norms = torch.linalg.vector_norm(stacked, dim=1)  # [num_losses]
    weights = torch.where(norms > 0, 1.0 / (norms + 1e-8), 0.0).detach()  # [num_losses]
    by_name = {name: weights[i] for i, name in enumerate(losses)}
    total_weight = weights.sum()
    total = cast(torch.Tensor, sum(by_name[name] * loss for name, loss in losses.items()))
    if preserve_magnitude:
        total = total / total_weight.clamp(min=torch.finfo(torch.float32).tiny)
    return total, by_name
