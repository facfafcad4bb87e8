"""GradMag: combine several losses by the magnitude of their gradients (ALM_SPEC.md §7.3,
`approx_gradmag_preserve_mag`).

Owns `last_block_parameters` and `gradmag_combine`. For each loss L_i, G_i is its gradient w.r.t. the trainable
parameters of the last transformer block (the LoRA A/B there in LoRA mode); `w_i = 1 / (‖G_i‖₂ + 1e-8)`, detached;
the total is `Σ w_i L_i / Σ w_i`. Cost: one extra backward through the last block per loss. Must not import
`alm.config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from alm.errors import AlmError


def last_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the model's last transformer block.

    The block list is the longest `nn.ModuleList` in the model (`model.layers` in Llama/Qwen, `transformer.h` in
    GPT-2, also under a peft wrapper).

    Raises:
        AlmError: no block list, or the last block has no trainable parameter (then GradMag cannot weigh the losses:
            make the last block trainable, or in LoRA mode make LoRA cover it).
    """
    blocks = max(
        (module for module in model.modules() if isinstance(module, nn.ModuleList)),
        key=len,
        default=None,
    )
    if blocks is None or len(blocks) == 0:
        raise AlmError(
            f"{type(model).__name__} has no list of transformer blocks; GradMag needs one."
        )
    parameters = [parameter for parameter in blocks[-1].parameters() if parameter.requires_grad]
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
    preserve_magnitude: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weight each loss by the inverse norm of its last-block gradient.

    Args:
        losses: name → scalar loss (each must depend on `parameters` through the graph).
        parameters: `last_block_parameters(model)`.
        preserve_magnitude: divide by Σ w_i (the paper's default); False gives `approx_gradmag`.

    Returns:
        `(total, weights)`: the scalar to backpropagate and the detached weights by name. A loss whose gradient
        is zero (e.g. a micro-batch without ALM groups) gets weight 0; if all are zero, the plain sum is returned.
    """
    norms: dict[str, torch.Tensor] = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            norms[name] = torch.zeros((), device=loss.device)
            continue
        grads = torch.autograd.grad(loss, list(parameters), retain_graph=True, allow_unused=True)
        squares = [grad.float().square().sum() for grad in grads if grad is not None]
        norms[name] = (
            torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=loss.device)
        )
    weights = {
        name: torch.where(norm > 0, 1.0 / (norm + 1e-8), 0.0).detach()
        for name, norm in norms.items()
    }
    # `sum` of tensors is a tensor (its typing adds the `0` start)
    total_weight = cast(torch.Tensor, sum(weights.values()))
    if not bool(total_weight > 0):
        return cast(torch.Tensor, sum(losses.values())), dict.fromkeys(losses, 1.0)
    total = cast(torch.Tensor, sum(weights[name] * loss for name, loss in losses.items()))
    if preserve_magnitude:
        total = total / total_weight
    return total, {name: float(weight) for name, weight in weights.items()}
