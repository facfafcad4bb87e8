"""The ALM loss on the model side (ALM_SPEC.md §5, §6): student statistics, group sums, divergences, normaliser.

Owns the next-token shift (`next_token_ids`, `logp_of_token`), `token_stats` (chunked log-softmax + boundary
log-mass), `binarised_divergence`, `alm_loss` (from padded targets), `alm_batch_loss` and `alm_live_teacher_loss` (from per-token teacher
values, for a live teacher). Must not import `alm.config`.

Glossary for shape comments: B batch, Ts student length, Tt teacher length, V (padded) student vocab, G groups.

The student's per-token log-probs and boundary log-mass are computed by one autograd Function that walks the
logits in row blocks: forward keeps only two fp32 numbers per row (the full and the boundary-masked logsumexp),
backward rebuilds the softmax block by block, so the only [N, V] tensor besides the logits is their gradient.
Peak memory is therefore below `F.cross_entropy` on the same logits (which keeps an [N, V] log-softmax and two
[N, V] gradients), even for 256k vocabularies. All maths is fp32; padded vocab columns (≥ `vocab_size`) are
excluded from both sums and get zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from alm.align.chunks import Chunks
from alm.align.targets import build_alm_targets
from alm.errors import AlmError
from alm.losses.batch import PaddedTargets, pad_targets

Divergence = Literal["binary_ce", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit"]
DIVERGENCES: tuple[str, ...] = (
    "binary_ce",
    "reverse_binary_kl",
    "abs_exp",
    "abs",
    "binary_kl_temp_limit",
)

_BLOCK_BYTES = 1 << 25  # fp32 size of one row block (32 MiB); the working set is a few blocks


class AlmLossOutput(NamedTuple):
    """The ALM loss of a micro-batch and what to log about it.

    Attributes:
        loss: scalar to backpropagate: Σ over groups of the divergence / the normaliser.
        num_groups: valid groups in this micro-batch (int64 scalar tensor).
        mean_abs_logp_diff: mean |LT − LS| over them (detached; the paper's "legacy loss" metric).
        excess: Σ over groups of (divergence − its value at LS = LT) / the same normaliser, detached, float64. For
            `binary_ce` this is the binary KL: the cross-entropy above the teacher's own binary entropy, which at
            τ = 100 is most of the loss and cannot be trained away; for the other divergences the floor is 0 and
            `excess == loss`. The figure to watch (issue 8 defect 9).
    """

    loss: torch.Tensor
    num_groups: torch.Tensor
    mean_abs_logp_diff: torch.Tensor
    excess: torch.Tensor


class _TokenStats(torch.autograd.Function):
    """(logits [N, V], target [N]) → (log p(target) [N], log boundary mass [N]), row block by row block.

    One exp per logit in each direction: the boundary mass is the masked sum of the same exponentials as the
    normaliser (`e @ mask`), and its gradient is the softmax rescaled by `exp(lse - boundary_lse)`. Rows whose
    boundary mass underflows (< 1e-30 of the total) take an exact masked logsumexp path instead.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        boundary_mask: torch.Tensor | None,
        vocab_size: int,
        rows_per_block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows = logits.shape[0]
        lse = logits.new_empty(num_rows, dtype=torch.float32)
        boundary_lse = logits.new_zeros(num_rows, dtype=torch.float32)
        target_logit = logits.new_zeros(num_rows, dtype=torch.float32)
        has_target = target >= 0
        safe_target = target.clamp(min=0)
        mask_weight = None if boundary_mask is None else boundary_mask.float()  # [V']
        boundary_tiny = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
        for row in range(0, num_rows, rows_per_block):
            rows = slice(row, row + rows_per_block)
            block = logits[
                rows, :vocab_size
            ].float()  # [R, V'] fp32 (no copy for fp32 logits: never modified)
            target_logit[rows] = block.gather(1, safe_target[rows, None])[:, 0]
            row_max = block.amax(dim=-1)  # [R]
            exps = (block - row_max[:, None]).exp_()  # [R, V']
            lse[rows] = row_max + exps.sum(dim=-1).log()
            if mask_weight is not None:
                boundary_mass = exps @ mask_weight  # [R], relative to exp(row_max)
                boundary_lse[rows] = row_max + boundary_mass.log()
                boundary_tiny[rows] = boundary_mass < 1e-30
        if boundary_mask is not None and bool(
            boundary_tiny.any()
        ):  # one device sync per call; rare rows
            tiny_rows = boundary_tiny.nonzero()[:, 0]
            for start in range(0, len(tiny_rows), rows_per_block):
                index = tiny_rows[start : start + rows_per_block]
                exact = (
                    logits[index, :vocab_size].float().masked_fill(~boundary_mask, float("-inf"))
                )
                boundary_lse[index] = exact.logsumexp(dim=-1)
        raw_logp = torch.where(has_target, target_logit - lse, 0.0)
        raw_boundary = boundary_lse - lse if boundary_mask is not None else torch.zeros_like(lse)
        ctx.save_for_backward(
            logits,
            safe_target,
            has_target & (raw_logp <= 0),
            raw_boundary <= 0,
            lse,
            boundary_lse,
            boundary_mask if boundary_mask is not None else torch.empty(0, dtype=torch.bool),
        )
        ctx.vocab_size, ctx.rows_per_block, ctx.has_mask = (
            vocab_size,
            rows_per_block,
            boundary_mask is not None,
        )
        return raw_logp.clamp(max=0.0), raw_boundary.clamp(max=0.0)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_logp, grad_boundary = grad_outputs
        logits, safe_target, logp_live, boundary_live, lse, boundary_lse, boundary_mask = (
            ctx.saved_tensors
        )
        vocab_size, rows_per_block = ctx.vocab_size, ctx.rows_per_block
        grad_logp = torch.where(logp_live, grad_logp.float(), 0.0)  # [N]
        grad_boundary = (
            torch.where(boundary_live, grad_boundary.float(), 0.0)
            if ctx.has_mask
            else torch.zeros_like(grad_logp)
        )
        # d lse / d x = softmax p; d boundary_lse / d x = mask · exp(x − boundary_lse) = mask · p · exp(lse − b_lse).
        log_ratio = lse - boundary_lse  # [N] ≥ 0
        direct = (
            log_ratio >= 60.0
        )  # boundary mass below e^-60: rescaling p would overflow, use exp(x − b_lse)
        ratio = torch.exp(torch.where(direct, 0.0, log_ratio))
        boundary_scale = torch.where(direct, 0.0, grad_boundary * ratio)  # [N]
        mask_weight = boundary_mask.float() if ctx.has_mask else None
        grad_logits = torch.zeros_like(logits)
        for row in range(0, logits.shape[0], rows_per_block):
            rows = slice(row, row + rows_per_block)
            block = logits[rows, :vocab_size].float()  # [R, V']
            grad = (block - lse[rows, None]).exp_()  # softmax p, [R, V']
            coefficient = -(grad_logp[rows] + grad_boundary[rows])  # [R]
            if mask_weight is not None:
                scale = mask_weight[None, :] * boundary_scale[rows, None]  # [R, V']
                grad.mul_(scale.add_(coefficient[:, None]))
            else:
                grad.mul_(coefficient[:, None])
            grad.scatter_add_(1, safe_target[rows, None], grad_logp[rows, None])
            grad_logits[rows, :vocab_size] = grad.to(logits.dtype)
        if mask_weight is not None and bool(direct.any()):  # one device sync per call; rare rows
            direct_rows = direct.nonzero()[:, 0]
            for start in range(0, len(direct_rows), rows_per_block):
                index = direct_rows[start : start + rows_per_block]
                block = logits[index, :vocab_size].float()  # [R, V']
                coefficient = -(grad_logp[index] + grad_boundary[index])  # [R]
                grad = (block - lse[index, None]).exp_() * coefficient[:, None]
                exact = (block - boundary_lse[index, None]).exp_().masked_fill_(~boundary_mask, 0.0)
                grad += exact * grad_boundary[index, None]
                grad.scatter_add_(1, safe_target[index, None], grad_logp[index, None])
                grad_logits[index, :vocab_size] = grad.to(logits.dtype)
        return grad_logits, None, None, None, None


def next_token_ids(input_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The next-token shift, the one place it is written: int64 [B, T] whose entry q is the id of token q + 1 (the
    target the logits at q score), -1 at the last position and wherever `keep` (bool [B, T], over the *scored*
    token q + 1) is False. Position 0 is never a target."""
    following = input_ids[:, 1:]  # [B, T-1]
    if keep is not None:
        following = torch.where(keep[:, 1:].bool(), following, -1)
    return torch.cat([following, following.new_full((input_ids.shape[0], 1), -1)], dim=1).long()


def logp_of_token(next_logp: torch.Tensor, *, fill: float) -> torch.Tensor:
    """Undo the shift: [B, T] values scored at q for token q + 1 -> indexed by the token, `fill` at q = 0."""
    return torch.cat([next_logp.new_full((next_logp.shape[0], 1), fill), next_logp[:, :-1]], dim=1)


def token_stats(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    boundary_mask: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    block_bytes: int = _BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of a target id and boundary log-mass per row of logits, without an [N, V] fp32 intermediate.

    Args:
        logits: [..., V] (any float dtype; maths in fp32). V may include padded columns.
        target_ids: int64 [...], the id whose log-prob is wanted per row; -1 for none (gives 0).
        boundary_mask: bool [V] or [vocab_size], the boundary token set (§5.2), or None to skip the boundary term
            (then the second output is 0).
        vocab_size: real vocabulary size; columns ≥ it are padding and excluded (§13.15). Default: all columns.
        block_bytes: fp32 working-set size per row block.

    Returns:
        `(logp, boundary_logmass)`, fp32 [...] each, both clipped to ≤ 0.

    Raises:
        AlmError: the boundary mask is empty or longer than the logits.
    """
    shape = logits.shape[:-1]
    num_columns = logits.shape[-1]
    vocab_size = num_columns if vocab_size is None else int(vocab_size)
    if boundary_mask is not None:
        boundary_mask = boundary_mask.to(device=logits.device, dtype=torch.bool)
        if boundary_mask.shape[0] < vocab_size:
            raise AlmError(
                f"boundary mask covers {boundary_mask.shape[0]} ids but the vocabulary has {vocab_size}; build it with "
                "vocab.boundary_mask(...) for the student's own vocabulary."
            )
        boundary_mask = boundary_mask[:vocab_size]
        if not bool(boundary_mask.any()):
            raise AlmError(
                "the boundary mask selects no token; it must contain at least the special tokens."
            )
    flat_logits = logits.reshape(-1, num_columns)
    # At most `block_bytes` of fp32 per block, and at most 1/8 of the rows, so the working set stays a small
    # fraction of the logits for short inputs too.
    num_rows = flat_logits.shape[0]
    rows_per_block = max(1, min(block_bytes // (4 * max(vocab_size, 1)), -(-num_rows // 8)))
    logp, boundary_logmass = _TokenStats.apply(
        flat_logits, target_ids.reshape(-1).long(), boundary_mask, vocab_size, rows_per_block
    )
    return logp.reshape(shape), boundary_logmass.reshape(shape)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (§6.1); both branches finite for x ≤ −ε."""
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def binarised_divergence(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    *,
    temperature: float = 100.0,
    divergence: Divergence = "binary_ce",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Element-wise binarised divergence between teacher and student chunk log-probs (§6.1).

    With `a = LT/τ − ε` and `b = LS/τ − ε` (tempered Bernoulli probabilities eᵃ, eᵇ):
    `binary_ce` −[eᵃ b + (1 − eᵃ) log(1 − eᵇ)] (the paper's f = KL, up to the teacher's binary entropy),
    `reverse_binary_kl` eᵇ(b − a) + (1 − eᵇ)(log(1 − eᵇ) − log(1 − eᵃ)), `abs_exp` |eᵃ − eᵇ|,
    `abs` |LT − LS|, `binary_kl_temp_limit` (LT − LS) + LT log(−LS) − LT log(−LT) (with LT, LS shifted by −ε).

    Args:
        teacher_logp: float [...], teacher (group) log-probs, ≤ 0 (no gradient expected).
        student_logp: float [...], student (group) log-probs, ≤ 0, same shape.
        temperature: τ > 0.
        divergence: one of `DIVERGENCES`.
        eps: shift that keeps log(1 − eᵇ) finite when a log-prob is exactly 0.

    Returns:
        fp32 [...] (fp64 for fp64 inputs), the per-chunk loss.

    Raises:
        AlmError: unknown divergence or non-positive temperature.
    """
    if temperature <= 0:
        raise AlmError(f"temperature must be > 0, got {temperature}; the paper's default is 100.")
    # fp32 maths (fp64 when both inputs are fp64, for reference-grade logging). Finite range: a -inf log-prob
    # (e.g. an empty boundary class) would turn 0·inf into NaN.
    dtype = torch.promote_types(
        torch.promote_types(teacher_logp.dtype, student_logp.dtype), torch.float32
    )
    teacher_logp = teacher_logp.to(dtype).clamp(min=-1e30, max=0.0)
    student_logp = student_logp.to(dtype).clamp(min=-1e30, max=0.0)
    match divergence:
        case "binary_ce":
            a, b = teacher_logp / temperature - eps, student_logp / temperature - eps
            return -(torch.exp(a) * b + (-torch.expm1(a)) * _log1mexp(b))
        case "reverse_binary_kl":
            a, b = teacher_logp / temperature - eps, student_logp / temperature - eps
            return torch.exp(b) * (b - a) + (-torch.expm1(b)) * (_log1mexp(b) - _log1mexp(a))
        case "abs_exp":
            a, b = teacher_logp / temperature - eps, student_logp / temperature - eps
            return torch.abs(torch.exp(a) - torch.exp(b))
        case "abs":
            return torch.abs(teacher_logp - student_logp)
        case "binary_kl_temp_limit":
            lt, ls = teacher_logp - eps, student_logp - eps
            return (lt - ls) + lt * torch.log(-ls) - lt * torch.log(-lt)
        case _:
            raise AlmError(
                f"unknown ALM divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}."
            )


def student_group_logp(
    student_token_logp: torch.Tensor,
    student_boundary_logmass: torch.Tensor | None,
    targets: PaddedTargets,
) -> torch.Tensor:
    """Debiased student group log-probs LS [B, G] from per-token values (§5.1–§5.2).

    Args:
        student_token_logp: fp32 [B, Ts], `log p_S(token_q | tokens[:q])` (anything at q = 0: never used).
        student_boundary_logmass: fp32 [B, Ts], boundary log-mass after token q; None for no debiasing (the
            group log-prob is then the plain token sum).
        targets: padded targets from `pad_targets` (`student_group_start/_end/_last_pos`, `group_mask`,
            `group_has_boundary_term`).

    Returns:
        fp32 [B, G]; padded groups hold 0.
    """
    batch, length = student_token_logp.shape
    group_mask = targets.group_mask  # [B, G]
    start = torch.where(
        group_mask, targets.student_group_start, torch.iinfo(torch.int64).max
    )  # [B, G]
    position = torch.arange(length, device=student_token_logp.device).expand(
        batch, length
    )  # [B, Ts]
    group = torch.searchsorted(start, position.contiguous(), right=True) - 1  # [B, Ts]
    safe_group = group.clamp(min=0)
    in_group = (
        (group >= 0)
        & (position < targets.student_group_end.gather(1, safe_group))
        & group_mask.gather(1, safe_group)
    )
    sums = torch.zeros(
        group_mask.shape, dtype=torch.float32, device=student_token_logp.device
    ).scatter_add(1, safe_group, torch.where(in_group, student_token_logp, 0.0))  # [B, G]
    group_logp = sums.clamp(max=0.0)  # [B, G]
    if student_boundary_logmass is not None:
        boundary = student_boundary_logmass.gather(
            1, targets.student_group_last_pos.clamp(min=0)
        )  # [B, G]
        # none after a block (and none at all for targets built with debias=False)
        group_logp = group_logp + torch.where(targets.group_has_boundary_term, boundary, 0.0)
    return torch.where(group_mask, group_logp, 0.0)


def alm_loss(
    student_logits: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_boundary_mask: torch.Tensor,
    targets: PaddedTargets,
    *,
    temperature: float = 100.0,
    divergence: Divergence = "binary_ce",
    num_valid_groups_global: int | float | torch.Tensor | None = None,
    eps: float = 1e-6,
    vocab_size: int | None = None,
    debias: bool = True,
) -> AlmLossOutput:
    """The ALM loss of one micro-batch from student logits and padded teacher targets (§6.4).

    Args:
        student_logits: [B, Ts, V] (logits at q predict token q+1); any float dtype, maths in fp32.
        student_input_ids: int64 [B, Ts], the student tokens, right-padded (the targets' positions index these
            rows as built; padding beyond each example's groups is ignored).
        student_boundary_mask: bool [V'], the student's boundary token set (first byte space/newline/tab/other
            whitespace, or special), `vocab.boundary_mask(...)`.
        targets: `pad_targets([...])` of the examples' `AlmTargets`, on the logits' device.
        temperature: τ (default 100).
        divergence: the binarised divergence (default `binary_ce`).
        num_valid_groups_global: number of valid groups in the whole optimizer step (all micro-batches and ranks,
            §6.3); None uses this micro-batch's count (a plain mean).
        eps: ε of the divergence.
        vocab_size: real student vocabulary size when the logits are padded.
        debias: add the student's boundary log-mass at each group's end (§5.2); must match how the targets were
            built (`build_alm_targets(..., debias=...)`). False skips the boundary sums entirely.

    Returns:
        `AlmLossOutput(loss, num_groups, mean_abs_logp_diff, excess)`.
    """
    next_logp, boundary_logmass = token_stats(
        student_logits,
        next_token_ids(student_input_ids),
        student_boundary_mask if debias else None,
        vocab_size=vocab_size,
    )
    token_logp = logp_of_token(next_logp, fill=0.0)  # [B, Ts], logp[q] of token q
    group_mask = targets.group_mask
    student_logp = student_group_logp(
        token_logp, boundary_logmass if debias else None, targets
    )  # [B, G]
    teacher_logp = torch.where(group_mask, targets.teacher_group_logp.float(), -1.0)  # [B, G]
    student_logp = torch.where(group_mask, student_logp, -1.0)
    per_group = binarised_divergence(
        teacher_logp, student_logp, temperature=temperature, divergence=divergence, eps=eps
    )
    num_groups = group_mask.sum()
    normaliser = (
        num_groups.clamp(min=1) if num_valid_groups_global is None else num_valid_groups_global
    )
    loss = torch.where(group_mask, per_group, 0.0).sum() / normaliser
    with torch.no_grad():
        diff = torch.where(
            group_mask, (teacher_logp - student_logp).abs(), 0.0
        ).sum() / num_groups.clamp(min=1)
        # The divergence's floor is its value at LS = LT (the teacher's binary entropy for binary_ce); float64,
        # since at tau = 100 the excess is a few percent of the loss.
        teacher64, student64 = teacher_logp.double(), student_logp.double()
        options = {"temperature": temperature, "divergence": divergence, "eps": eps}
        excess_per_group = binarised_divergence(
            teacher64, student64, **options
        ) - binarised_divergence(teacher64, teacher64, **options)  # [B, G]
        excess = torch.where(group_mask, excess_per_group, 0.0).sum() / normaliser
    return AlmLossOutput(loss, num_groups, diff, excess)


def alm_batch_loss(
    student_logits: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_boundary_mask: torch.Tensor,
    chunks: Sequence[Chunks],
    teacher_logp: Sequence[np.ndarray],
    teacher_boundary_logmass: Sequence[np.ndarray],
    *,
    gamma: float = 0.1,
    temperature: float = 100.0,
    divergence: Divergence = "binary_ce",
    num_valid_groups_global: int | float | torch.Tensor | None = None,
    drop_unterminated_groups: bool = True,
    vocab_size: int | None = None,
    debias: bool = True,
) -> AlmLossOutput:
    """The whole ALM loss from per-token teacher values as NumPy arrays (a store's) and student logits.

    Builds each example's targets (`alm.align.build_alm_targets`), pads them, and calls `alm_loss`. For teacher
    values in tensors (a live teacher's `sequence_logp_and_boundary_logmass`) use `alm_live_teacher_loss`.

    Args:
        student_logits: [B, Ts, V].
        student_input_ids: int64 [B, Ts].
        student_boundary_mask: bool [V], the student's boundary set.
        chunks: per example, the `Chunks` from `alm.align_chunks` / `align_sequences`.
        teacher_logp: per example, float NumPy [n_b] teacher `log p(token_q | tokens[:q])` (NaN or anything
            at 0).
        teacher_boundary_logmass: per example, float NumPy [n_b] teacher boundary log-mass after token q.
        gamma, temperature, divergence, num_valid_groups_global, drop_unterminated_groups, vocab_size, debias:
            as in `build_alm_targets` and `alm_loss`.

    Returns:
        `AlmLossOutput`.
    """
    per_example = [
        build_alm_targets(
            example_chunks,
            np.asarray(logp, dtype=np.float64),
            np.asarray(boundary, dtype=np.float64),
            gamma=gamma,
            drop_unterminated_groups=drop_unterminated_groups,
            debias=debias,
        )
        for example_chunks, logp, boundary in zip(
            chunks, teacher_logp, teacher_boundary_logmass, strict=True
        )
    ]
    targets = pad_targets(per_example).to(student_logits.device)
    return alm_loss(
        student_logits,
        student_input_ids,
        student_boundary_mask,
        targets,
        temperature=temperature,
        divergence=divergence,
        num_valid_groups_global=num_valid_groups_global,
        vocab_size=vocab_size,
        debias=debias,
    )


def alm_live_teacher_loss(
    student_logits: torch.Tensor,
    student_input_ids: torch.Tensor,
    student_boundary_mask: torch.Tensor,
    chunks: Sequence[Chunks],
    teacher_logp: Sequence[torch.Tensor],
    teacher_boundary_logmass: Sequence[torch.Tensor],
    **options: Any,
) -> AlmLossOutput:
    """`alm_batch_loss` for teacher values in tensors, e.g. a live teacher's `sequence_logp_and_boundary_logmass`.

    Args:
        student_logits, student_input_ids, student_boundary_mask, chunks: as in `alm_batch_loss`.
        teacher_logp: per example (a [B, Tt] tensor iterates as one), float [n_b] on any device; detached here
            (the teacher is a constant of the loss).
        teacher_boundary_logmass: per example, float [n_b].
        **options: the keyword options of `alm_batch_loss` (gamma, temperature, divergence, ...).

    Returns:
        `AlmLossOutput`.
    """

    def to_numpy(values: torch.Tensor) -> np.ndarray:
        return values.detach().to("cpu", torch.float64).numpy()

    return alm_batch_loss(
        student_logits,
        student_input_ids,
        student_boundary_mask,
        chunks,
        [to_numpy(v) for v in teacher_logp],
        [to_numpy(v) for v in teacher_boundary_logmass],
        **options,
    )


def sequence_logp_and_boundary_logmass(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    boundary_mask: torch.Tensor,
    *,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values in the store's convention, e.g. from a live teacher's logits.

    Args:
        logits: [B, T, V].
        input_ids: int64 [B, T].
        boundary_mask: bool [V], the model's boundary token set.
        vocab_size: real vocabulary size when the logits are padded.

    Returns:
        `(logp, boundary_logmass)`, fp32 [B, T]: `logp[:, q] = log p(token_q | tokens[:q])` (NaN at q = 0) and
        the boundary log-mass of the distribution after token q.
    """
    next_logp, boundary_logmass = token_stats(
        logits, next_token_ids(input_ids), boundary_mask, vocab_size=vocab_size
    )
    return logp_of_token(next_logp, fill=float("nan")), boundary_logmass
