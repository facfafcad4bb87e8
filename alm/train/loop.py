"""`alm train`: train a student from teacher stores (DESIGN.md stage two, ALM_SPEC §6-§8).

    alm train stages/demo_train.yaml                                   # CPU or one GPU
    alm train stages/demo_train.yaml --set optim.lr=3e-5 --resume      # continue the newest checkpoint
    torchrun --nproc-per-node 8 -m alm.cli train stages/paper_llama3_to_qwen2.yaml   # DDP (or FSDP2) on N GPUs

`run_train(cfg)` is the whole loop, readable top to bottom: check stores -> output folder -> student -> data ->
optimizer -> [evaluate] -> for each step: precount the step's ALM groups over all micro-batches and ranks, forward
and backward each micro-batch (normalised by the global counts, §6.3), clip, step, log, checkpoint -> save the
student with `save_pretrained`. The same code runs on 1 and N processes (`alm.train.parallel`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from alm.config import config_hash, load_yaml_model
from alm.config.train import TrainRecipe
from alm.data.loader import MicroBatches, make_loader
from alm.data.student import StudentExampleBuilder
from alm.errors import ConfigError, StoreError, StoreMismatchError
from alm.store.reader import open_store
from alm.train import parallel
from alm.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from alm.train.evaluate import eval_batches, evaluate
from alm.train.log import METRICS_FILE, RunLog, plot_metrics, read_metrics, truncate_metrics
from alm.train.step import (
    LossSettings,
    TrainModule,
    make_projector,
    micro_batch_loss,
)
from alm.train.student import apply_lora, load_student, save_student

logger = logging.getLogger(__name__)

RUN_FILE = "alm-run.json"
STUDENT_DIR = "student"
_OUR_ENTRIES = (
    RUN_FILE,
    STUDENT_DIR,
    "checkpoints",
    METRICS_FILE,
    "train.log",
    "tensorboard",
    "config.yaml",
)


@dataclass(frozen=True)
class StoreInfo:
    """What the loop needs to know about the training stores (all share one teacher tokenizer)."""

    teacher_vocab: Any
    teacher_model: str | None
    teacher_fingerprint: str
    hidden_size: int
    num_sequences: int


def _plan_value(store: Any, key: str) -> Any:
    manifest = store.manifest
    for source in (
        manifest,
        manifest.get("plan", {}),
        getattr(store, "plan_doc", {}).get("plan", {}),
    ):
        if isinstance(source, dict) and source.get(key) is not None:
            return source[key]
    return None


def check_stores(cfg: TrainRecipe) -> StoreInfo:
    """Open every store, compare fingerprints with the recipe, check the fields the losses need. No model loads.

    Raises:
        StoreError: a store is missing or unfinished, or lacks a field a loss needs.
        StoreMismatchError: a fingerprint differs from the recipe's, or the stores disagree.
    """
    problems: list[str] = []
    info: StoreInfo | None = None
    paths = [ref.path for ref in cfg.stores] + ([cfg.eval.store] if cfg.eval else [])
    expected = {ref.path: ref for ref in cfg.stores}
    for path in paths:
        store = open_store(path)
        fingerprint = _plan_value(store, "tokenizer_fingerprint") or store.vocab.fingerprint()
        ref = expected.get(path)
        if (
            ref
            and ref.teacher_tokenizer_fingerprint
            and ref.teacher_tokenizer_fingerprint != fingerprint
        ):
            raise StoreMismatchError(
                f"store {path}: teacher tokenizer fingerprint is {fingerprint}, but the recipe expects "
                f"{ref.teacher_tokenizer_fingerprint}; point stores[].path at the right store or update the recipe"
            )
        data_fingerprint = _plan_value(store, "data_spec_fingerprint")
        if ref and ref.data_fingerprint and ref.data_fingerprint != data_fingerprint:
            raise StoreMismatchError(
                f"store {path}: data fingerprint is {data_fingerprint}, but the recipe expects "
                f"{ref.data_fingerprint}; point stores[].path at the right store or update the recipe"
            )
        if info is None:
            hidden = store.field_specs.get("hidden")
            info = StoreInfo(
                teacher_vocab=store.vocab,
                teacher_model=_plan_value(store, "teacher_model"),
                teacher_fingerprint=fingerprint,
                hidden_size=int(hidden["shape"][-1]) if hidden else 0,
                num_sequences=0,
            )
        elif fingerprint != info.teacher_fingerprint:
            raise StoreMismatchError(
                f"store {path} has teacher tokenizer fingerprint {fingerprint}, but {paths[0]} has "
                f"{info.teacher_fingerprint}; all stores of one run must come from the same teacher tokenizer"
            )
        if cfg.loss.hidden > 0 and "hidden" not in store.fields and ref is not None:
            problems.append(
                f"store {path} has no `hidden` field (it stores {list(store.fields)}) but loss.hidden="
                f"{cfg.loss.hidden}; rerun precompute with hidden states or set loss.hidden: 0"
            )
        if ref is not None:
            info = StoreInfo(
                **{**info.__dict__, "num_sequences": info.num_sequences + store.num_sequences}
            )
    if problems:
        raise StoreError("\n".join(problems))
    assert info is not None
    return info


def prepare_output_dir(cfg: TrainRecipe, resume: bool, overwrite: bool) -> Path:
    """Make the run folder ours: new, resumed, or (with `--overwrite`) replaced. Never touches a foreign folder.

    Raises:
        ConfigError: the folder holds another run (without --resume/--overwrite) or files that are not a run.
    """
    out = Path(cfg.output_dir)
    run_file = out / RUN_FILE
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; choose a folder path")
    if entries and not run_file.is_file():
        raise ConfigError(
            f"output_dir {out} is not empty and is not an alm training run (no {RUN_FILE}; has {sorted(entries)[:5]}); "
            "choose a new or empty folder"
        )
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if resume:
            if previous.get("config_hash") != config_hash(cfg):
                logger.warning(
                    "resuming with a changed recipe (was %s, now %s)",
                    previous.get("config_hash"),
                    config_hash(cfg),
                )
            return out
        if not overwrite:
            raise ConfigError(
                f"output_dir {out} already holds a training run (recipe hash {previous.get('config_hash')}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another output_dir"
            )
        for name in _OUR_ENTRIES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
    )
    run_file.write_text(
        json.dumps({"kind": "alm-train-run", "config_hash": config_hash(cfg)}, indent=2) + "\n"
    )
    return out


def teacher_hidden_second_moment(store_path: str) -> torch.Tensor:
    """Per-channel mean of the squared teacher hidden state over the first shard: the hidden loss's constant
    normaliser (ALM_SPEC §7.1, §13.14: a dataset constant, not a per-batch value)."""
    store = open_store(store_path)
    shard = store.read_shard(
        store.shard_indices[0], ["token_id", "logp", "boundary_logmass", "hidden"]
    )
    rows = []
    for seq in shard.sequences():
        hidden = seq.hidden_float32()
        if hidden is None:
            raise StoreError(
                f"store {store_path} has no `hidden` field, which the hidden-state loss needs"
            )
        rows.append(hidden)
    values = np.concatenate(rows)  # [N, d_T]
    return torch.from_numpy(np.square(values.astype(np.float64)).mean(axis=0).astype(np.float32))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def run_train(
    cfg: TrainRecipe,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_steps: int | None = None,
) -> Path:
    """Train the student of `cfg`; return the folder of the saved student.

    Args:
        cfg: the validated recipe.
        resume: continue from the newest checkpoint in `cfg.output_dir`.
        overwrite: replace a previous run of ours in `cfg.output_dir`.
        stop_after_steps: stop (with a checkpoint) after this many steps, as if interrupted (tests).

    Raises:
        AlmError subclasses for every user mistake (checked before any model loads where possible).
    """
    device = parallel.init()
    stores = check_stores(cfg)
    out = Path(cfg.output_dir)
    if parallel.is_main():
        prepare_output_dir(cfg, resume, overwrite)
    parallel.barrier()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    student = load_student(cfg.student, teacher_model=stores.teacher_model, seed=cfg.seed)
    hf_model = apply_lora(student.model, cfg.lora) if cfg.lora else student.model
    names = tuple(cfg.loss.losses())
    projector = None
    if "hidden" in names:
        projector = make_projector(
            student.model.config.get_text_config().hidden_size, stores.hidden_size
        )
    module = TrainModule(hf_model, projector)
    module.train()
    model = parallel.wrap(module, cfg.parallel, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    total_steps, accum = cfg.optim.steps, cfg.optim.grad_accum
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.optim.warmup_steps, total_steps)
    )
    start_step = 0
    checkpoints = list_checkpoints(out) if resume else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1])
        parallel.load_full_state(model, optimizer, state["model"], state["optimizer"])
        start_step = restore_checkpoint(state, scheduler)
        del state
        logger.info("resumed from %s (step %d)", checkpoints[-1], start_step)
    if resume and parallel.is_main():
        truncate_metrics(out, start_step)

    family = student.family
    boundary_ids = cfg.loss.boundary_class_ids()
    builder_args = {
        "teacher_vocab": stores.teacher_vocab,
        "student_tokenizer": student.tokenizer,
        "student_vocab": student.vocab,
        "student_family": family,
        "max_length": cfg.student.max_length,
        "boundary_class_ids": boundary_ids,
        "gamma": cfg.loss.gamma,
        "debias": cfg.loss.debias,
    }
    fields = ["token_id", "logp", "boundary_logmass"] + (["hidden"] if "hidden" in names else [])
    dataset = MicroBatches(
        [ref.path for ref in cfg.stores],
        StudentExampleBuilder(**builder_args, with_hidden="hidden" in names),
        micro_batch_size=cfg.optim.micro_batch_size,
        seed=cfg.seed,
        fields=fields,
        rank=parallel.rank(),
        world_size=parallel.world_size(),
    )
    batches = make_loader(dataset, start_step * accum, total_steps * accum, cfg.num_workers)
    vocab_size = len(student.vocab.token_bytes)
    boundary_mask = torch.as_tensor(student.vocab.boundary_mask(boundary_ids), device=device)
    second_moment = teacher_hidden_second_moment(cfg.stores[0].path) if "hidden" in names else None
    settings = LossSettings(
        names,
        cfg.loss.temperature,
        cfg.loss.divergence,
        cfg.loss.hidden,
        cfg.loss.combine,
        second_moment,
        cfg.loss.debias,
    )
    train_module = parallel.unwrap(model)
    assert isinstance(train_module, TrainModule)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    def autocast() -> contextlib.AbstractContextManager:
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def run_eval(step: int) -> None:
        if cfg.eval is None:
            return
        eval_builder = StudentExampleBuilder(**builder_args, with_eval=True)
        figures = evaluate(
            model,
            eval_batches(
                cfg.eval.store,
                eval_builder,
                cfg.optim.micro_batch_size,
                parallel.rank(),
                parallel.world_size(),
                cfg.eval.max_sequences,
            ),
            device,
            parallel.all_reduce_sum,
            autocast,
            vocab_size,
        )
        log.write(step, figures)
        logger.info(
            "eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in figures.items())
        )

    log = RunLog(out, total_steps, start_step, enabled=parallel.is_main())
    if start_step == 0:
        run_eval(0)
    world = parallel.world_size()
    for step in range(start_step, total_steps):
        micro_batches = [next(batches) for _ in range(accum)]
        # §6.3: normalise by the valid groups (and SFT tokens, hidden chunks) of the whole step, all ranks.
        # (`sum` of tensors is a tensor; its typing adds the `0` start)
        local = torch.stack(
            [
                cast(torch.Tensor, sum(mb["num_groups"] for mb in micro_batches)),
                cast(torch.Tensor, sum(mb["num_sft_tokens"] for mb in micro_batches)),
                cast(torch.Tensor, sum(mb["chunk_mask"].sum() for mb in micro_batches)),
            ]
        ).to(device)
        counts: dict[str, torch.Tensor] = dict(
            zip(
                ("num_groups", "num_sft_tokens", "num_hidden"),
                parallel.all_reduce_sum(local),
                strict=True,
            )
        )
        # Logged values add up over micro-batches and processes (each is a share of the step's global mean);
        # GradMag weights are the same on every process, so their sum over both is divided by accum * world.
        step_sums: dict[str, torch.Tensor] = {}
        for i, micro_batch in enumerate(micro_batches):
            micro_batch = {k: v.to(device) for k, v in micro_batch.items()}
            with parallel.no_sync(model, skip=i < accum - 1):
                with autocast():
                    loss, parts = micro_batch_loss(
                        model,
                        micro_batch,
                        settings,
                        boundary_mask,
                        counts,
                        vocab_size,
                        parallel.all_reduce_sum if world > 1 else None,
                    )
                (
                    loss * world
                ).backward()  # DDP/FSDP average over ranks; the losses are already global means
            for key, value in parts.items():
                share = value / (accum * world) if key.startswith("gradmag_weight_") else value
                step_sums[key] = step_sums[key] + share if key in step_sums else share
            log.count_tokens(int(micro_batch["attention_mask"].sum()) * world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        names_logged = sorted(step_sums)
        totals = parallel.all_reduce_sum(
            torch.stack([step_sums[key] for key in names_logged]).to(torch.float64)
        )
        step_metrics = {key: float(value) for key, value in zip(names_logged, totals, strict=True)}
        step_metrics.update(
            grad_norm=float(grad_norm), lr=lr, num_groups=float(counts["num_groups"])
        )
        done = step + 1
        log.step(done, step_metrics, write=done % cfg.log_every == 0 or done == total_steps)
        interrupted = (
            stop_after_steps is not None and done >= stop_after_steps and done < total_steps
        )
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or interrupted:
            state = parallel.full_state_dict(model)  # both collective under FSDP2
            optimizer_state = parallel.full_optimizer_state_dict(model, optimizer)
            if parallel.is_main():
                save_checkpoint(
                    out,
                    done,
                    model_state=state,
                    optimizer_state=optimizer_state,
                    scheduler=scheduler,
                    config_hash=config_hash(cfg),
                    keep=cfg.keep_checkpoints,
                )
            parallel.barrier()
        if (
            cfg.eval is not None
            and cfg.eval.every
            and done % cfg.eval.every == 0
            and done < total_steps
        ):
            run_eval(done)
        if interrupted:
            log.close()
            return out / STUDENT_DIR
    run_eval(total_steps)
    log.close()
    student_dir = out / STUDENT_DIR
    state = parallel.full_state_dict(model)  # collective under FSDP2: every rank takes part
    if parallel.is_main():
        save_student(
            train_module.student,
            student.tokenizer,
            student_dir,
            state_dict={
                k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")
            },
        )
        logger.info("student saved to %s; metrics in %s", student_dir, out / METRICS_FILE)
    parallel.barrier()
    return student_dir


def run_train_cli(
    recipe: str | Path, overrides: list[str], dry_run: bool, resume: bool, overwrite: bool
) -> str:
    """The `alm train` command: load and validate the recipe, check the stores, then train (or only print).

    Returns:
        the text the CLI prints: the resolved config (`--dry-run`) or where the student and metrics went.
    """
    cfg = load_yaml_model(TrainRecipe, recipe, overrides)
    info = check_stores(cfg)
    if dry_run:
        resolved = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
        return (
            f"{resolved}\n# recipe hash {config_hash(cfg)}; stores OK: {info.num_sequences} sequences, "
            f"teacher tokenizer {info.teacher_fingerprint}"
        )
    student_dir = run_train(cfg, resume=resume, overwrite=overwrite)
    main_process = parallel.is_main()
    parallel.shutdown()
    if not main_process:
        return ""  # under torchrun only rank 0 reports
    lines = [f"student: {student_dir}", f"metrics: {Path(cfg.output_dir) / METRICS_FILE}"]
    evals = [r for r in read_metrics(Path(cfg.output_dir)) if "eval/student_bpb" in r]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(
            f"held-out bits per byte: student {first['eval/student_bpb']:.3f} (step {first['step']}) -> "
            f"{last['eval/student_bpb']:.3f} (step {last['step']}); teacher {last['eval/teacher_bpb']:.3f}; "
            f"chunk |log p_T - log p_S| {first['eval/chunk_abs_logp_diff']:.3f} -> {last['eval/chunk_abs_logp_diff']:.3f}"
        )
    plot = plot_metrics(Path(cfg.output_dir))
    if plot is not None:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)
