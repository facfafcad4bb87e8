"""The `alm train` command: load and validate the recipe, check the stores, then train or only check
(`--dry-run`: stores, student tokenizer, one rendered example per store, the loss region; no model loads).
`alm.cli` calls `run_train_cli`; the training itself is `alm.train.loop.run_train`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alm.config import config_hash, load_yaml_model
from alm.config.train import TrainRecipe
from alm.store.reader import open_store
from alm.store.replace import output_write_error
from alm.store.verify import check_store_files
from alm.train import parallel
from alm.train.alignments import check_alignment_caches
from alm.train.loader import (
    MicroBatches,
    check_stores,
    example_builder,
    loss_region_sample_batches,
    training_fields,
)
from alm.train.log import METRICS_FILE, plot_metrics, read_metrics
from alm.train.loop import run_train
from alm.train.run_dir import check_output_dir, finished_message
from alm.train.run_lock import check_run_lock
from alm.train.step import check_lr_schedule, refuse_empty_loss_region
from alm.train.student import load_student_tokenizer


def run_train_cli(
    recipe: str | Path, overrides: list[str], dry_run: bool, resume: bool, overwrite: bool
) -> str:
    """The `alm train` command: load and validate the recipe, check the stores, then train (or only print).

    Returns:
        the text the CLI prints: the resolved config (`--dry-run`) or where the student and metrics went.
    """
    cfg = load_yaml_model(TrainRecipe, recipe, overrides)
    if dry_run:
        return dry_run_report(cfg)
    if resume:
        check_output_dir(
            cfg, resume, overwrite
        )  # a refused change is refused on a finished run too
        if (finished := finished_message(cfg)) is not None:
            return finished
    try:
        student_dir = run_train(cfg, resume=resume, overwrite=overwrite)
    except Exception as err:  # a full disk while saving a checkpoint or the student: one message
        message = output_write_error(err, cfg.output_dir)
        if message is None:
            raise
        raise message from None
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


def dry_run_report(cfg: TrainRecipe) -> str:
    """`--dry-run`: everything short of loading the model. The stores (fingerprints, every file's checksum), the
    student tokenizer (loads, reproduces bytes, template family), one example of each store rendered for the
    student and aligned, and the loss region of the first sequences; the resolved recipe.

    Raises:
        AlmError subclasses: the first problem found (the same error the run would stop with).
    """
    info = check_stores(cfg)
    check_lr_schedule(cfg.optim)
    check_run_lock(cfg.output_dir)
    paths = [ref.path for ref in cfg.stores] + ([cfg.eval.store] if cfg.eval else [])
    checked = [check_store_files(path) for path in dict.fromkeys(paths)]
    student = load_student_tokenizer(cfg.student, teacher_model=info.teacher_model)
    builder = example_builder(cfg, info.teacher_vocab, student)
    lines = [
        f"# student tokenizer {student.source!r}: {len(student.vocab.token_bytes)} tokens, "
        f"{student.family} template family"
    ]
    training_paths = [ref.path for ref in cfg.stores]
    for path in dict.fromkeys(paths):
        training = path in training_paths
        fields = training_fields(cfg) if training else ["token_id", "logp", "boundary_logmass"]
        seq = next(open_store(path).iter_sequences(fields))
        example = (builder if training else builder.for_evaluation())(seq)
        ids = example.input_ids.tolist()
        shown = student.tokenizer.decode(ids[:_SHOWN_TOKENS], skip_special_tokens=False)
        lines.append(
            f"# {path}: sequence {seq.seq_id} ({seq.doc_id}): {len(seq.token_id)} teacher tokens -> "
            f"{len(ids)} student tokens, {example.targets.num_groups} ALM group(s) and "
            f"{int(example.sft_mask.sum())} SFT token(s) in the loss region; "
            f"first {min(len(ids), _SHOWN_TOKENS)} student tokens: {shown!r}"
        )
    dataset = MicroBatches(
        info,
        builder,
        micro_batch_size=cfg.optim.micro_batch_size,
        seed=cfg.seed,
        fields=training_fields(cfg),
    )
    refuse_empty_loss_region(
        [dataset[k] for k in range(loss_region_sample_batches(cfg))],
        cfg.loss.losses(),
        lambda counts: counts,
        max_length=cfg.student.max_length,
    )
    lines += [f"# {line}" for line in check_alignment_caches(cfg)]
    resolved = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
    return "\n".join(
        [
            resolved,
            *lines,
            f"# recipe hash {config_hash(cfg)}; stores OK: {info.num_sequences} sequences, teacher tokenizer "
            f"{info.teacher_fingerprint}; every file of {sum(r.num_shards_checked for r in checked)} shard(s) "
            "matches its checksum",
        ]
    )


_SHOWN_TOKENS = 24
