"""The optimizer step on the model side: forward, the chosen losses, their combination (ALM_SPEC §6-§8).

Owns `TrainModule` (the HF student plus, for the hidden-state loss, a learnt projection when widths differ;
one module so DDP/FSDP2 wrap both), `micro_batch_loss`, the step's counts (`step_counts`), AdamW with its
schedule (`make_optimizer`) and the precision context. Loss maths lives in `alm.losses`; this file only
routes tensors: student logits -> `alm_loss` / `sft_loss`, final-norm hidden states -> `hidden_loss`, several
losses -> GradMag over the last transformer block (`alm.losses.gradmag`).

Normalisers are global over the optimizer step (all micro-batches and ranks, §6.3), passed in as `counts`; GradMag's
gradient norms are the global micro-batch's (all ranks, `alm.losses.gradmag`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from alm.config.train import BaselineLoss, LossConfig, OptimConfig
from alm.errors import ConfigError
from alm.losses.alm import Divergence, alm_loss
from alm.losses.baselines import topk_forward_kl, topk_kd_loss, uld_loss
from alm.losses.gradmag import gradmag_combine, last_block_parameters
from alm.losses.hidden import hidden_state_loss, make_hidden_projection
from alm.losses.sft import sft_loss
from alm.train.batch import StudentBatch
from alm.train.embedding_projector import EmbeddingProjector


class TrainModule(nn.Module):
    """The student; when the hidden-state loss is on, its projection into the teacher's hidden width; and the
    optional embedding projector on its input embeddings (`alm.train.embedding_projector`)."""

    def __init__(
        self,
        student: nn.Module,
        projector: nn.Module | None = None,
        embedding_projector: EmbeddingProjector | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.embedding_projector = embedding_projector

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.embedding_projector is None:
            inputs = {"input_ids": input_ids}
        else:
            # E' = E + P(E) on the rows looked up (the saved student folds it into its table)
            embedding = self.student.get_input_embeddings()  # pyright: ignore[reportCallIssue]
            assert isinstance(embedding, nn.Module)
            table = embedding.weight
            assert isinstance(table, torch.Tensor)
            rows = nn.functional.embedding(input_ids, table)  # [B, Ts, d]
            inputs = {"inputs_embeds": embedding(input_ids) + self.embedding_projector(rows)}
        out = self.student(
            **inputs, attention_mask=attention_mask, output_hidden_states=with_hidden
        )
        if not with_hidden:
            return out.logits, None
        hidden = out.hidden_states[
            -1
        ]  # [B, Ts, d_S], after the final norm (the LM-head input, §7.1)
        if self.projector is not None:
            hidden = self.projector(hidden)
        return out.logits, hidden


def make_projector(student_width: int, teacher_width: int) -> nn.Module | None:
    """A linear map student -> teacher hidden width (None when the widths agree, §7.1)."""
    return make_hidden_projection(student_width, teacher_width)


@dataclass(frozen=True)
class LossSettings:
    """What `micro_batch_loss` computes (from the recipe's `loss` section)."""

    names: tuple[str, ...]  # subset of ("alm", "sft", "hidden"), in this order
    temperature: float
    divergence: Divergence
    hidden_weight: float
    combine: str  # "gradmag" or "sum"
    teacher_second_moment: torch.Tensor | None = (
        None  # fp32 [d_T], the hidden loss's per-channel normaliser
    )
    debias: bool = True  # add the student's boundary log-mass at group ends (§5.2)
    baseline: BaselineLoss | None = None  # a baseline from the stored top-k (docs/baselines.md)
    baseline_weight: float = (
        0.1  # w of (1 - w)·SFT + w·baseline under combine "sum" (uld/mined + sft)
    )


def micro_batch_loss(
    model: nn.Module,
    batch: StudentBatch,
    settings: LossSettings,
    boundary_mask: torch.Tensor,
    counts: StepCounts,
    vocab_size: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to backpropagate for one micro-batch (this process's share), and its parts for logging.

    Args:
        model: the (wrapped) `TrainModule`.
        batch: the micro-batch on the model's device (`alm.train.batch.collate`).
        settings: which losses and their options.
        boundary_mask: bool [V] the student's boundary token set.
        counts: the step's global counts (`step_counts`).
        vocab_size: the student tokenizer's size (logit columns beyond it are padding).
        all_reduce_sum: sums over data-parallel processes (GradMag's global micro-batch gradients); None on one
            process.

    Returns:
        the combined loss (scalar) and detached fp64 scalars to log, each *additive* over micro-batches and
        processes: every per-loss value and `alm_abs_logp_diff` are this share of the step's global mean (`alm`
        is the excess over the teacher's floor, the binary KL for `binary_ce`; `alm_raw` the optimised value), and
        `gradmag_weight_*` (several losses under GradMag) are this global micro-batch's weights, the same on every
        process (the caller averages them over the step's micro-batches).

    Raises:
        AlmError: under GradMag, a loss gets no gradient on the last block.
    """
    with_hidden = "hidden" in settings.names
    logits, hidden = model(batch.input_ids, batch.attention_mask, with_hidden)
    losses: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}
    if "alm" in settings.names:
        num_groups = counts.num_groups.clamp(min=1)
        out = alm_loss(
            logits,
            batch.input_ids,
            boundary_mask,
            batch.targets,
            temperature=settings.temperature,
            divergence=settings.divergence,
            num_valid_groups_global=num_groups,
            vocab_size=vocab_size,
            debias=settings.debias,
        )
        losses["alm"] = out.loss
        # headline: the excess over the teacher's own floor (the binary KL for binary_ce); raw: what is optimised
        metrics["alm_raw"] = out.loss
        metrics["alm_excess"] = out.excess
        # the micro-batch's mean times its groups: its share of the step's mean over all groups
        metrics["alm_abs_logp_diff"] = out.mean_abs_logp_diff * out.num_groups / num_groups
    if "sft" in settings.names:
        losses["sft"] = sft_loss(
            logits,
            batch.input_ids,
            batch.sft_mask,
            num_tokens_global=counts.num_sft_tokens.clamp(min=1),
            vocab_size=vocab_size,
        )
    if with_hidden:
        assert hidden is not None and batch.hidden_teacher is not None
        teacher_hidden = batch.hidden_teacher  # [B, C, d_T], already gathered at the chunk ends
        teacher_pos = torch.arange(teacher_hidden.shape[1], device=teacher_hidden.device).expand(
            teacher_hidden.shape[0], -1
        )  # [B, C]
        second_moment = settings.teacher_second_moment
        losses["hidden"] = settings.hidden_weight * hidden_state_loss(
            hidden,
            teacher_hidden,
            batch.targets.student_chunk_last_pos,
            teacher_pos,
            batch.targets.chunk_mask,
            teacher_second_moment=None
            if second_moment is None
            else second_moment.to(hidden.device),
            num_valid_chunks_global=counts.num_hidden.clamp(min=1),
        )
    if settings.baseline is not None:
        losses[settings.baseline] = _baseline_loss(
            logits, batch, settings.baseline, counts, vocab_size
        )
    for name, value in losses.items():
        metrics[name] = value
    if "alm" in losses:
        metrics["alm"] = metrics.pop("alm_excess")
    if settings.combine == "sum" and settings.baseline in ("uld", "mined") and "sft" in losses:
        # FuseLLM's MinED: 0.9·CE + 0.1·KL; ULD's CE + λ·ULD likewise as (1 - w)·SFT + w·ULD
        w = settings.baseline_weight
        assert settings.baseline is not None
        total = (1.0 - w) * losses["sft"] + w * losses[settings.baseline]
        total = total + sum(
            (v for k, v in losses.items() if k not in ("sft", settings.baseline)),
            torch.zeros_like(total),
        )
    elif len(losses) == 1 or settings.combine == "sum":
        total = cast(torch.Tensor, sum(losses.values()))
    else:
        # read after the forward: under FSDP2 these are the unsharded tensors the forward used
        total, weights = gradmag_combine(
            losses, last_block_parameters(model), all_reduce_sum=all_reduce_sum
        )
        for name, weight in weights.items():
            metrics[f"gradmag_weight_{name}"] = weight
    metrics["loss"] = total
    return total, {name: value.detach().double() for name, value in metrics.items()}


def _baseline_loss(
    logits: torch.Tensor,
    batch: StudentBatch,
    baseline: BaselineLoss,
    counts: StepCounts,
    vocab_size: int,
) -> torch.Tensor:
    """A baseline's loss on the student logits at the paired positions (`alm.train.batch.baseline_positions`)."""
    distill = batch.distill
    assert distill is not None, "a baseline loss needs StudentExampleBuilder(baseline=...)"
    index = distill.student_pos[..., None].expand(-1, -1, logits.shape[-1])  # [B, P, V']
    picked = logits.gather(1, index)  # [B, P, V'], the logits predicting each paired token
    num_positions = counts.num_distill.clamp(min=1)
    match baseline:
        case "topk_kd":
            return topk_kd_loss(
                picked,
                distill.topk_id,
                distill.topk_logp,
                distill.mask,
                num_positions_global=num_positions,
                vocab_size=vocab_size,
            )
        case "uld":
            return uld_loss(
                picked,
                distill.topk_logp,
                distill.mask,
                num_positions_global=num_positions,
                vocab_size=vocab_size,
            )
        case "mined":
            # the ids were carried through the MinED map in the builder (`MinedVocabMap`): the KL of
            # `mined_kl_loss` on student ids
            return topk_forward_kl(
                picked,
                distill.topk_id,
                distill.topk_logp,
                distill.mask,
                num_positions_global=num_positions,
                vocab_size=vocab_size,
            )


def loss_settings(loss: LossConfig, teacher_second_moment: torch.Tensor | None) -> LossSettings:
    """`LossSettings` from the recipe's `loss` section."""
    return LossSettings(
        names=tuple(loss.losses()),
        temperature=loss.temperature,
        divergence=loss.divergence,
        hidden_weight=loss.hidden,
        combine=loss.combine,
        teacher_second_moment=teacher_second_moment,
        debias=loss.debias,
        baseline=loss.baseline(),
        baseline_weight=loss.baseline_weight,
    )


@dataclass(frozen=True)
class StepCounts:
    """The step's global normalisers (§6.3): valid ALM groups, SFT tokens and hidden-state chunks over all its
    micro-batches and processes (int64 scalars)."""

    num_groups: torch.Tensor
    num_sft_tokens: torch.Tensor
    num_hidden: torch.Tensor
    num_distill: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.tensor(0)
    )  # a baseline's paired positions (0 without a baseline)


def step_counts(
    micro_batches: list[StudentBatch],
    device: torch.device,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> StepCounts:
    """Count this process's groups, SFT tokens and hidden-state chunks over the step's micro-batches, and sum the
    counts over processes (`all_reduce_sum`)."""
    local = torch.tensor(
        [
            sum(int(b.targets.num_groups) for b in micro_batches),
            sum(int(b.num_sft_tokens) for b in micro_batches),
            sum(int(b.targets.chunk_mask.sum()) for b in micro_batches),
            sum(int(b.distill.mask.sum()) for b in micro_batches if b.distill is not None),
        ],
        dtype=torch.int64,
        device=device,
    )
    num_groups, num_sft_tokens, num_hidden, num_distill = all_reduce_sum(local)
    return StepCounts(num_groups, num_sft_tokens, num_hidden, num_distill)


def empty_losses(counts: StepCounts, loss_names: list[str]) -> list[str]:
    """The active losses that have nothing to learn from in `counts`: no valid ALM group, no SFT token in the loss
    region, no hidden-state chunk, no position a baseline pairs (`topk_kd`, `uld`, `mined`)."""
    have = {
        "alm": int(counts.num_groups),
        "sft": int(counts.num_sft_tokens),
        "hidden": int(counts.num_hidden),
    }
    return [name for name in loss_names if have.get(name, int(counts.num_distill)) == 0]


def refuse_empty_loss_region(
    batches: list[StudentBatch],
    loss_names: list[str],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    *,
    max_length: int,
) -> None:
    """Refuse to train when a sample of the data (`batches`, e.g. the first steps' micro-batches) gives some active
    loss nothing at all to learn from: every step would log loss 0 and change nothing.

    Raises:
        ConfigError: the sample has no valid ALM group / SFT token / hidden chunk for an active loss.
    """
    counts = step_counts(batches, torch.device("cpu"), all_reduce_sum)
    empty = empty_losses(counts, loss_names)
    if not empty:
        return
    num_sequences = sum(int(b.input_ids.shape[0]) for b in batches)
    raise ConfigError(
        f"nothing to train on: the first {num_sequences} sequence(s) give the {' and '.join(empty)} loss no "
        f"{'valid chunk group' if empty[0] != 'sft' else 'token'} in the loss region (the bytes the data spec "
        f"marks for the loss, within the first student.max_length={max_length} student tokens). Raise "
        "student.max_length, or check the data spec's loss region (e.g. loss: assistant on text without an "
        "assistant turn)"
    )


def make_optimizer(
    params: list[nn.Parameter], optim: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its learning-rate schedule (`make_schedule`; default: linear warmup, linear decay to 0, §8).

    Raises:
        ConfigError: `optim.lr_scheduler_kwargs` do not fit `optim.lr_scheduler_type`.
    """
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim))


def apply_schedule(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """Set every learning rate to the schedule's value at the scheduler's step, after a checkpoint's optimizer and
    scheduler states were loaded: they carry the rate the checkpointed run would use next, which is not this
    recipe's when `optim.steps` changed (a finished run, extended, would otherwise take a step at lr 0.0 and then
    jump). With the recipe unchanged the values are the same floats."""
    rates = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports for the next step


def lr_factor(optim: OptimConfig) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step (0-based), from `transformers.get_scheduler`.

    The warmup steps take the factor of the *next* step, so warmup ends on the peak and no step runs at lr 0
    (transformers starts warmup at 0, which wastes the first step); after warmup the factor is transformers'.

    Raises:
        ConfigError: `optim.lr_scheduler_kwargs` do not fit `optim.lr_scheduler_type`.
    """
    from transformers import get_scheduler

    # A throwaway optimizer: only the schedule's factor function is kept (a picklable functools.partial). Its lr
    # is the peak, since `cosine_with_min_lr`'s `min_lr` is divided by it.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
    try:
        schedule = get_scheduler(
            optim.lr_scheduler_type,
            probe,
            num_warmup_steps=optim.warmup_steps,
            num_training_steps=optim.steps,
            scheduler_specific_kwargs=dict(optim.lr_scheduler_kwargs),
        )
        assert isinstance(
            schedule, torch.optim.lr_scheduler.LambdaLR
        )  # every schedule offered is one
        hf_factor = schedule.lr_lambdas[0]
        hf_factor(0)
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ConfigError(
            f"optim.lr_scheduler_type {optim.lr_scheduler_type!r} with lr_scheduler_kwargs "
            f"{dict(optim.lr_scheduler_kwargs)}: {err}"
        ) from None
    return functools.partial(_warmup_shifted, hf_factor=hf_factor, warmup=optim.warmup_steps)


# `check_lr_schedule` evaluates the schedule at every step up to this many steps, else at this many spread evenly.
_SCHEDULE_CHECK_STEPS = 10_000


def check_lr_schedule(optim: OptimConfig) -> None:
    """Refuse a learning-rate schedule that cannot run, before any model loads (`alm train`, `--dry-run`).

    The schedule is built against a throwaway optimizer over one parameter (`lr_factor`) and evaluated at every
    step (spread evenly over long runs): each factor must be a number in [0, 1], i.e. every step's rate lies
    between 0 and `optim.lr` (e.g. `cosine_with_min_lr` with `min_lr_rate: 2`, `polynomial` with a negative
    `power`, `inverse_sqrt` with `timescale: 0` are refused).

    Raises:
        ConfigError: the kwargs do not fit the schedule, or a step's factor is not in [0, 1].
    """
    factor = lr_factor(optim)
    total = optim.steps
    steps = (
        range(total)
        if total <= _SCHEDULE_CHECK_STEPS
        else sorted(
            {
                round(i * (total - 1) / (_SCHEDULE_CHECK_STEPS - 1))
                for i in range(_SCHEDULE_CHECK_STEPS)
            }
        )
    )
    described = (
        f"optim.lr_scheduler_type {optim.lr_scheduler_type!r} with lr_scheduler_kwargs "
        f"{dict(optim.lr_scheduler_kwargs)}"
    )
    for step in steps:
        try:
            value = factor(step)
        except (TypeError, ValueError, ArithmeticError) as err:
            raise ConfigError(
                f"{described} fails at step {step + 1}: {type(err).__name__}: {err}"
            ) from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0 + 1e-12):
            raise ConfigError(
                f"{described} gives step {step + 1} the rate {value!r} x optim.lr; every step's rate must lie "
                f"between 0 and optim.lr ({optim.lr}): fix the schedule's arguments"
            )


def _warmup_shifted(step: int, hf_factor: Callable[[int], float], warmup: int) -> float:
    return float(hf_factor(step + 1 if step < warmup else step))


def precision_context(use_bf16: bool, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device (GPU runs with `precision: auto`), or nothing."""
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
