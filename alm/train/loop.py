"""`alm train`: train a student from teacher stores (DESIGN.md stage two, ALM_SPEC §6-§8).

    alm train stages/demo_train.yaml                                   # CPU or one GPU
    alm train stages/demo_train.yaml --set optim.lr=3e-5 --resume      # continue the newest checkpoint
    torchrun --nproc-per-node 8 -m alm.cli train stages/paper_llama3_to_qwen2.yaml   # DDP (or FSDP2) on N GPUs

`run_train(cfg)` is the whole loop, readable top to bottom: check stores -> output folder -> student -> data ->
optimizer -> [evaluate] -> for each step: count the step's ALM groups, SFT tokens and hidden chunks over all
micro-batches and ranks, forward and backward each micro-batch (normalised by those global counts, §6.3), clip,
step, log, checkpoint -> save the student with `save_pretrained`. The same code runs on 1 and N processes
(`alm.train.parallel`). One batch travels: `loader.MicroBatches` (stores -> `batch.StudentBatch`) ->
`step.micro_batch_loss` (-> `alm.losses`) -> `backward()`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from alm.config import config_hash
from alm.config.train import TrainRecipe
from alm.errors import ConfigError
from alm.store.replace import remove_replaced, written_run_files
from alm.train import parallel
from alm.train.alignments import check_alignment_caches, find_cache
from alm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    save_run_checkpoint,
)
from alm.train.embedding_projector import fold_embedding_table, make_embedding_projector
from alm.train.evaluate import evaluate_store
from alm.train.loader import (
    MicroBatches,
    check_stores,
    example_builder,
    loss_region_sample_batches,
    make_loader,
    teacher_hidden_second_moment,
    training_fields,
)
from alm.train.log import METRICS_FILE, RunLog, truncate_metrics
from alm.train.run_dir import (
    check_output_dir,
    finished_message,
    mark_finished,
    prepare_output_dir,
    student_dir,
)
from alm.train.run_lock import RunLock, check_run_lock
from alm.train.signals import RunInterruptedError, StopSignals
from alm.train.step import (
    TrainModule,
    apply_schedule,
    check_lr_schedule,
    empty_losses,
    loss_settings,
    make_optimizer,
    make_projector,
    micro_batch_loss,
    precision_context,
    refuse_empty_loss_region,
    step_counts,
)
from alm.train.student import (
    SAVE_DTYPES,
    apply_lora,
    enable_gradient_checkpointing,
    load_student,
    load_student_tokenizer,
    push_student,
    save_student,
)

logger = logging.getLogger(__name__)


def run_train(cfg: TrainRecipe, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the student of `cfg`; return the folder of the saved student.

    With `cfg.stop_after_steps` the run ends early with a checkpoint, as if interrupted (continue with
    `resume=True`). Ctrl-C or SIGTERM during the steps finishes the current step, saves a checkpoint and raises
    `RunInterruptedError` (continue with `resume=True`: bit for bit on CPU).

    Args:
        cfg: the validated recipe.
        resume: continue from the newest checkpoint in `cfg.output_dir` (a finished run returns at once).
        overwrite: replace a previous run of ours in `cfg.output_dir`.

    Raises:
        AlmError subclasses for every user mistake (checked before any model loads where possible);
        RunInterruptedError on SIGINT/SIGTERM.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    with StopSignals() as stop, contextlib.ExitStack() as held:
        return _run_train(cfg, resume, overwrite, stop, held)


def _run_train(
    cfg: TrainRecipe, resume: bool, overwrite: bool, stop: StopSignals, held: contextlib.ExitStack
) -> Path:
    device = parallel.init()
    stores = check_stores(cfg)
    check_lr_schedule(cfg.optim)  # bad lr_scheduler_kwargs are refused before any model loads
    if any(ref.alignments == "required" for ref in cfg.stores):
        check_alignment_caches(
            cfg
        )  # a missing or stale required cache is refused before any model loads
    out = Path(cfg.output_dir)
    check_output_dir(cfg, resume, overwrite)  # refused before the tokenizer and the model load
    # One live invocation per run folder: a live holder is refused here, writing nothing (the lock itself is taken
    # atomically when the folder is prepared); rank 0 checks, every rank learns if it failed.
    parallel.on_main(lambda: check_run_lock(out), "check the run lock")
    if resume and finished_message(cfg) is not None:
        logger.info("%s", finished_message(cfg))
        return student_dir(cfg)
    stop.setup_hint = "rerun with --resume" if resume else stop.setup_hint
    with_hidden = cfg.loss.hidden > 0

    # The student's tokenizer and the data (this process's micro-batches), checked before anything is written
    # or any model loads: a refused tokenizer or an empty loss region fails here.
    student_tokenizer = load_student_tokenizer(cfg.student, teacher_model=stores.teacher_model)
    baseline = cfg.loss.baseline()
    if (
        baseline == "topk_kd"
        and student_tokenizer.vocab.fingerprint() != stores.teacher_fingerprint
    ):
        raise ConfigError(
            f"loss.kind topk_kd needs the teacher's tokenizer, but the student tokenizer has fingerprint "
            f"{student_tokenizer.vocab.fingerprint()} and the store's teacher {stores.teacher_fingerprint}; use "
            "uld, mined+sft or alm for a student with another tokenizer"
        )
    builder = example_builder(cfg, stores.teacher_vocab, student_tokenizer)
    dataset = MicroBatches(
        stores,
        builder,
        micro_batch_size=cfg.optim.micro_batch_size,
        seed=cfg.seed,
        fields=training_fields(cfg),
        rank=parallel.rank(),
        world_size=parallel.world_size(),
        alignment_caches=[find_cache(ref, builder, with_hidden=with_hidden) for ref in cfg.stores],
    )
    refuse_empty_loss_region(
        [dataset[k] for k in range(loss_region_sample_batches(cfg))],
        cfg.loss.losses(),
        parallel.all_reduce_sum,
        max_length=cfg.student.max_length,
    )
    changes = (
        parallel.on_main(
            lambda: _take_lock_and_prepare(held, cfg, resume, overwrite, student_tokenizer.family),
            "take the run lock and prepare the run folder",
        )
        or []
    )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # The student (one module with the hidden-state projection), wrapped for 1 or N processes, and AdamW.
    student = load_student(
        cfg.student, teacher_model=stores.teacher_model, seed=cfg.seed, tokenizer=student_tokenizer
    )
    if cfg.student.gradient_checkpointing:
        enable_gradient_checkpointing(student.model)
    projector_kind = (
        cfg.student.transfer.embedding_projector if cfg.student.transfer else "identity"
    )
    student_width = student.model.config.get_text_config().hidden_size
    embedding_projector = make_embedding_projector(
        projector_kind, student.model.get_input_embeddings(), student_width
    )
    hf_model = apply_lora(student.model, cfg.lora) if cfg.lora else student.model
    settings = loss_settings(
        cfg.loss, teacher_hidden_second_moment(cfg.stores[0].path) if with_hidden else None
    )
    projector = make_projector(student_width, stores.hidden_size) if with_hidden else None
    module = TrainModule(hf_model, projector, embedding_projector)
    module.train()
    model = parallel.wrap(module, cfg.parallel, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg.optim)
    total_steps, accum = cfg.optim.steps, cfg.optim.grad_accum
    start_step = 0
    checkpoints = list_checkpoints(out) if resume else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1])
        parallel.load_full_state(model, optimizer, state["model"], state["optimizer"])
        start_step = restore_checkpoint(state, scheduler)
        apply_schedule(
            optimizer, scheduler
        )  # this recipe's rate at start_step (optim.steps may have changed)
        del state
    if resume and parallel.is_main():
        truncate_metrics(out, start_step)

    batches = make_loader(dataset, start_step * accum, total_steps * accum, cfg.num_workers)
    vocab_size = len(student.vocab.token_bytes)
    boundary_mask = torch.as_tensor(
        student.vocab.boundary_mask(cfg.loss.boundary_class_ids()), device=device
    )
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = functools.partial(precision_context, use_bf16, device.type)
    eval_args = (model, cfg, builder.for_evaluation(), device, autocast, vocab_size)

    log = RunLog(
        out,
        total_steps,
        start_step,
        enabled=parallel.is_main(),
        report_to=cfg.report_to,
        run_config=cfg.model_dump(mode="json", by_alias=True),
    )
    for change in changes:
        logger.info("resumed with a changed setting (recorded in config.yaml): %s", change)
    if checkpoints:
        logger.info(
            "resumed from %s (step %d of %d) at lr %.3g",
            checkpoints[-1],
            start_step,
            total_steps,
            lr_now(scheduler),
        )
    if start_step == 0 or _evaluates_at(cfg, start_step):  # a resumed run redoes that evaluation
        log.evaluation(start_step, evaluate_store(*eval_args))
    world = parallel.world_size()
    stop.deferring = True  # from here a signal ends the run after its step, with a checkpoint
    last_checkpoint = time.monotonic()
    for step in range(start_step, total_steps):
        micro_batches = [next(batches) for _ in range(accum)]
        counts = step_counts(micro_batches, device, parallel.all_reduce_sum)
        # Logged values add up over micro-batches and processes (each is a share of the step's global mean);
        # GradMag weights are the same on every process, so their sum over both is divided by accum * world.
        sums: dict[str, torch.Tensor] = {}
        for i, micro_batch in enumerate(micro_batches):
            batch = micro_batch.to(device)
            with parallel.no_sync(model, skip=i < accum - 1):
                with autocast():
                    loss, parts = micro_batch_loss(
                        model,
                        batch,
                        settings,
                        boundary_mask,
                        counts,
                        vocab_size,
                        parallel.all_reduce_sum if world > 1 else None,
                    )
                # DDP/FSDP average gradients over ranks; the losses are already global means
                (loss * world).backward()
            for key, value in parts.items():
                share = value / (accum * world) if key.startswith("gradmag_weight_") else value
                sums[key] = sums[key] + share if key in sums else share
            log.count_tokens(int(micro_batch.attention_mask.sum()) * world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        totals = parallel.all_reduce_sum(torch.stack([sums[key] for key in names]))
        metrics = {key: float(value) for key, value in zip(names, totals, strict=True)}
        metrics.update(grad_norm=float(grad_norm), lr=lr, num_groups=float(counts.num_groups))
        done = step + 1
        if empty := empty_losses(counts, cfg.loss.losses()):
            logger.warning("step %d: no valid %s in any of its sequences", done, " or ".join(empty))
        log.step(done, metrics, write=done % cfg.log_every == 0 or done == total_steps)
        stopping = cfg.stop_after_steps is not None and cfg.stop_after_steps <= done < total_steps
        # Ranks agree on stopping and on time-based checkpoints (each saves collectively).
        flags = torch.tensor(
            [
                float(stop.requested),
                float(bool(cfg.checkpoint_minutes))
                * float(time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes),
            ],
            device=device,
        )
        interrupted, due = (
            bool(v > 0) for v in (parallel.all_reduce_sum(flags) if world > 1 else flags)
        )
        by_steps = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
        if by_steps or due or stopping or interrupted or done == total_steps:
            save_run_checkpoint(out, done, model, optimizer, scheduler, cfg, config_hash(cfg))
            last_checkpoint = time.monotonic()
        if interrupted:
            log.close()
            raise RunInterruptedError(
                f"interrupted at step {done} of {total_steps}; checkpoint saved: rerun with --resume",
                stop.signum or signal.SIGTERM,
            )
        if stopping:
            log.close()
            return student_dir(cfg)
        if _evaluates_at(cfg, done):
            log.evaluation(done, evaluate_store(*eval_args))
    log.close()
    state = parallel.full_state_dict(model)  # collective under FSDP2: every rank takes part
    if parallel.is_main():
        fold = None  # with the embedding projector the saved table is W + P(W): a plain model, no projector
        if embedding_projector is not None:
            fold = functools.partial(
                fold_embedding_table,
                kind=embedding_projector.kind,
                projector_state=_with_prefix(state, "embedding_projector."),
            )
        save_student(
            module.student,
            student.tokenizer,
            student_dir(cfg),
            state_dict=_with_prefix(state, "student."),
            fold_input_embeddings=fold,
            family=student.family,
            dtype=SAVE_DTYPES[
                cfg.save_dtype if cfg.save_dtype != "auto" else "bf16" if use_bf16 else "fp32"
            ],
        )
        logger.info("student saved to %s; metrics in %s", student_dir(cfg), out / METRICS_FILE)
        mark_finished(cfg, total_steps)
        remove_replaced(out, written_run_files)  # a run replaced with --overwrite: only alm's files
        if cfg.push_to_hub:
            assert cfg.hub_model_id is not None  # the recipe requires it
            push_student(student_dir(cfg), cfg.hub_model_id, private=cfg.hub_private_repo)
    parallel.barrier()
    return student_dir(cfg)


def _take_lock_and_prepare(
    held: contextlib.ExitStack,
    cfg: TrainRecipe,
    resume: bool,
    overwrite: bool,
    student_family: str,
) -> list[str]:
    """Take the run lock (held until the run ends), then prepare the run folder under it."""
    held.enter_context(RunLock(cfg.output_dir))
    return prepare_output_dir(cfg, resume, overwrite, student_family)


def _with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _evaluates_at(cfg: TrainRecipe, step: int) -> bool:
    """Held-out evaluation points: before training, every `eval.every` steps and at the end."""
    every = cfg.eval.every if cfg.eval is not None else 0
    return step in (0, cfg.optim.steps) or bool(every and step % every == 0)


def lr_now(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The learning rate the next step uses."""
    return float(scheduler.get_last_lr()[0])
