"""The `alm train` command: load and validate the recipe, check the stores, then train or only print
(`--dry-run`). `alm.cli` calls `run_train_cli`; the training itself is `alm.train.loop.run_train`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from alm.config import config_hash, load_yaml_model
from alm.config.train import TrainRecipe
from alm.store.replace import output_write_error
from alm.store.verify import check_store_files
from alm.train import parallel
from alm.train.alignments import check_alignment_caches
from alm.train.loader import check_stores
from alm.train.log import METRICS_FILE, plot_metrics, read_metrics
from alm.train.loop import run_train


def run_train_cli(
    recipe: str | Path, overrides: list[str], dry_run: bool, resume: bool, overwrite: bool
) -> str:
    """The `alm train` command: load and validate the recipe, check the stores, then train (or only print).

    Returns:
        the text the CLI prints: the resolved config (`--dry-run`) or where the student and metrics went.
    """
    cfg = load_yaml_model(TrainRecipe, recipe, overrides)
    if dry_run:
        info = check_stores(cfg)
        paths = [ref.path for ref in cfg.stores] + ([cfg.eval.store] if cfg.eval else [])
        checked = [check_store_files(path) for path in dict.fromkeys(paths)]
        caches = "\n".join(f"# {line}" for line in check_alignment_caches(cfg))
        resolved = yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
        return (
            f"{resolved}\n# recipe hash {config_hash(cfg)}; stores OK: {info.num_sequences} sequences, "
            f"teacher tokenizer {info.teacher_fingerprint}; every file of "
            f"{sum(r.num_shards_checked for r in checked)} shard(s) matches its checksum\n{caches}"
        )
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
