"""Next-token cross-entropy of the student on its own tokens (ALM_SPEC.md §7.2).

Owns `sft_loss`. Uses the same row-blocked log-softmax as the ALM loss (`alm.losses.alm.token_stats`), so SFT
next to ALM costs no extra [N, V] fp32 tensor. Must not import `alm.config`.
"""

from __future__ import annotations

import torch

from alm.losses.alm import next_token_ids, token_stats


def sft_loss(
    student_logits: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_loss_mask: torch.Tensor,
    *,
    num_tokens_global: int | float | torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Sum of −log p_S(token_q | tokens[:q]) over trained positions q ≥ 1, divided by the global token count.

    Args:
        student_logits: [B, Ts, V] (logits at q predict token q+1).
        student_input_ids: int64 [B, Ts].
        student_loss_mask: bool [B, Ts], True where token q is a training target (position 0 is never one).
        num_tokens_global: number of trained tokens in the whole optimizer step (all micro-batches and ranks);
            None uses this micro-batch's count.
        vocab_size: real vocabulary size when the logits are padded.

    Returns:
        fp32 scalar.
    """
    target = next_token_ids(
        student_input_ids, keep=student_loss_mask
    )  # [B, Ts]; logits at q score q+1
    next_logp, _ = token_stats(student_logits, target, None, vocab_size=vocab_size)
    num_tokens = (target >= 0).sum()
    normaliser = num_tokens.clamp(min=1) if num_tokens_global is None else num_tokens_global
    return -next_logp.sum() / normaliser
