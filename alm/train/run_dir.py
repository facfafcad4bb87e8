"""The run folder of `alm train`: what is in it and the rules for reusing it (docs/training.md "Outputs").

Owns `RUN_FILE`, `STUDENT_DIR`, `prepare_output_dir` and `student_dir`. A new or empty folder starts a run; a
folder holding one of our runs is refused unless resumed or overwritten (then only our own entries are replaced),
except a run that stopped before its first checkpoint (nothing to keep: it starts again); a non-empty folder that
is not an alm run is always refused and never touched (STYLE.md §4). Resuming compares the recipe with the run's
`config.yaml`: changes that keep the resumed run equal to one trained in one go are applied and recorded
(`RESUMABLE_CHANGES`), the others refused. A finished run records its final step in `RUN_FILE`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from alm.config import config_hash
from alm.config.train import TrainRecipe
from alm.errors import ConfigError
from alm.store.replace import move_aside
from alm.train.checkpoint import CHECKPOINTS_DIR, list_checkpoints
from alm.train.log import LOG_FILE, METRICS_FILE
from alm.train.run_lock import is_lock_entry

logger = logging.getLogger(__name__)

RUN_FILE = "alm-run.json"
STUDENT_DIR = "student"
CONFIG_FILE = "config.yaml"
_OUR_ENTRIES = (
    RUN_FILE,
    STUDENT_DIR,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    LOG_FILE,
    "tensorboard",
    "wandb",
    CONFIG_FILE,
)


def student_dir(cfg: TrainRecipe) -> Path:
    """Where the final student is saved."""
    return Path(cfg.output_dir) / STUDENT_DIR


# Settings a resumed run may change: they do not alter the weights of the steps already taken or the data and
# randomness of the steps to come (the data order is a function of the seed and the step, not of optim.steps).
# Everything else (stores, student, loss, the optimizer's other settings, seed, precision, parallel) would make
# the resumed run differ from one trained in one go, and is refused.
RESUMABLE_CHANGES = (
    "optim.steps",
    "eval",
    "log_every",
    "checkpoint_every",
    "checkpoint_minutes",
    "keep_checkpoints",
    "stop_after_steps",
    "num_workers",
    "threads",
    "report_to",
    "save_dtype",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "keep_checkpoint_every_steps",
    "keep_checkpoint_every_minutes",
)


def recipe_changes(
    previous: object, current: object, path: str = ""
) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for every setting that differs between two resolved recipes.

    A key the previous recipe did not have (written by an older alm, with the default now) is not a change."""
    if not (isinstance(previous, dict) and isinstance(current, dict)):
        return [] if previous == current else [(path, previous, current)]
    changes: list[tuple[str, object, object]] = []
    for key, value in current.items():
        if key in previous:
            changes += recipe_changes(previous[key], value, f"{path}.{key}" if path else key)
    gone = [key for key in previous if key not in current]
    changes += [(f"{path}.{key}" if path else key, previous[key], None) for key in gone]
    return changes


def _resumable(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in RESUMABLE_CHANGES)


def _read_run_file(out: Path) -> dict:
    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def finished_step(out: Path) -> int | None:
    """The step a finished run saved its student at (None: not finished, or not a run)."""
    value = _read_run_file(out).get("finished_step")
    return int(value) if value is not None else None


def finished_message(cfg: TrainRecipe) -> str | None:
    """With `--resume`: the message that the run in `cfg.output_dir` is already finished at `optim.steps`, or
    None when there is something left to train."""
    out = Path(cfg.output_dir)
    done = finished_step(out)
    if done is None or done != cfg.optim.steps:
        return None
    return (
        f"the run in {out} is finished (step {done} of {cfg.optim.steps}); the student is in "
        f"{student_dir(cfg)}. Nothing to resume: extend it with --resume --set optim.steps=N (N > {done}), "
        "or start again with --overwrite"
    )


def mark_finished(cfg: TrainRecipe, step: int) -> None:
    """Record in the run file that the student of `step` is saved (`--resume` then says the run is finished)."""
    out = Path(cfg.output_dir)
    record = _read_run_file(out) | {"finished_step": step}
    _write_atomic(out / RUN_FILE, json.dumps(record, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_run_files(cfg: TrainRecipe, student_family: str | None) -> None:
    out = Path(cfg.output_dir)
    _write_atomic(
        out / CONFIG_FILE,
        yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False),
    )
    record: dict[str, object] = {"kind": "alm-train-run", "config_hash": config_hash(cfg)}
    if student_family is not None:
        record["student_family"] = student_family
    _write_atomic(out / RUN_FILE, json.dumps(record, indent=2) + "\n")


def _check_resumed_family(out: Path, previous: dict, student_family: str | None) -> None:
    """The student must render as it did before the resume: `family: auto` resolves from the tokenizer and its
    chat template (and resolved differently before alm used templates), so the recipe alone does not say."""
    recorded = previous.get("student_family")
    if student_family is None:
        return
    if recorded is None:
        if student_family.startswith("template"):
            logger.warning(
                "resuming %s, whose run file does not record how the student rendered: it now renders chat "
                "with its tokenizer's template (%s); if it was trained with a family before, resume with "
                "student.family set to it",
                out,
                student_family,
            )
        return
    if recorded != student_family:
        raise ConfigError(
            f"--resume: the run in {out} trained the student with template family {recorded!r}, but it would "
            f"now render with {student_family!r} (student.family resolves from the tokenizer and its chat "
            f"template); resume with student.family: {recorded.split(':')[0]!r}"
            + (
                " (the tokenizer's own template, unchanged)"
                if recorded.startswith("template")
                else ""
            )
            + ", or start a new run"
        )


def _check_resume(cfg: TrainRecipe, out: Path, previous: dict) -> list[str]:
    """The settings changed since the run's recipe, as `key: old -> new`; refuse changes that break exactness,
    a run without a checkpoint and a checkpoint past `optim.steps`."""
    checkpoints = list_checkpoints(out)
    if not checkpoints:
        raise ConfigError(
            f"--resume: {out} has no checkpoint yet (the run stopped before its first one), so there is nothing "
            "to resume; run the same command without --resume to start it again"
        )
    last_step = int(checkpoints[-1].name.removeprefix("step-"))
    if last_step > cfg.optim.steps:
        raise ConfigError(
            f"--resume: the newest checkpoint of {out} is at step {last_step}, past optim.steps "
            f"({cfg.optim.steps}); set optim.steps to at least {last_step}"
        )
    config_path = out / CONFIG_FILE
    if not config_path.is_file():
        if previous.get("config_hash") != config_hash(cfg):
            logger.warning(
                "resuming %s, whose %s is missing: the recipe cannot be compared with the run's",
                out,
                CONFIG_FILE,
            )
        return []
    old = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    changes = recipe_changes(old, cfg.model_dump(mode="json", by_alias=True))
    # student.family may change when the run records how the student rendered: `prepare_output_dir` then checks
    # that the new value resolves to that same rendering (`_check_resumed_family`)
    family_checked = previous.get("student_family") is not None
    refused = [
        (key, a, b)
        for key, a, b in changes
        if not _resumable(key) and not (key == "student.family" and family_checked)
    ]
    if refused:
        listed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in refused)
        raise ConfigError(
            f"--resume: the recipe differs from the run's in {out / CONFIG_FILE} where a resumed run would no "
            f"longer equal one trained in one go: {listed}. Resume with the run's values, or start a new run "
            f"(another output_dir, or --overwrite). A resumed run may change only {', '.join(RESUMABLE_CHANGES)}"
        )
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in changes]


def check_output_dir(cfg: TrainRecipe, resume: bool, overwrite: bool) -> list[str]:
    """The folder rules of `prepare_output_dir`, checked without writing anything (before any model loads).

    Returns:
        on `--resume`, the settings changed since the run's recipe (`key: old -> new`); else [].

    Raises:
        ConfigError: as `prepare_output_dir`.
    """
    out = Path(cfg.output_dir)
    run_file = out / RUN_FILE
    entries = [p.name for p in out.iterdir() if not is_lock_entry(p.name)] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file; choose a folder path")
    if entries and not run_file.is_file():
        raise ConfigError(
            f"output_dir {out} is not empty and is not an alm training run (no {RUN_FILE}; has {sorted(entries)[:5]}); "
            "choose a new or empty folder"
        )
    if resume and not run_file.is_file():
        raise ConfigError(
            f"--resume: {out} holds no training run to resume; run without --resume to start one"
        )
    if not run_file.is_file():
        return []
    previous = _read_run_file(out)
    if resume:
        return _check_resume(cfg, out, previous)
    if _started(out) and not overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a training run (recipe hash {previous.get('config_hash')}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another output_dir"
        )
    return []


def _started(out: Path) -> bool:
    """The run has something to keep: a checkpoint or a student."""
    return bool(list_checkpoints(out)) or (out / STUDENT_DIR).exists()


def prepare_output_dir(
    cfg: TrainRecipe, resume: bool, overwrite: bool, student_family: str | None = None
) -> list[str]:
    """Make the run folder ours: new, resumed, or (with `--overwrite`) replaced. Never touches a foreign folder.

    A run that stopped before its first checkpoint holds nothing to keep: the same command starts it again
    without `--overwrite` (its files are moved aside and deleted once the new student is saved).

    Returns:
        on `--resume`, the settings changed since the run's recipe (`key: old -> new`), now recorded in
        `config.yaml`; else [].

    Raises:
        ConfigError: the folder holds another run (without --resume/--overwrite) or files that are not a run;
            `--resume` without a run or a checkpoint, or with a change that breaks exactness.
    """
    out = Path(cfg.output_dir)
    changes = check_output_dir(cfg, resume, overwrite)
    if resume:
        _check_resumed_family(out, _read_run_file(out), student_family)
    if (out / RUN_FILE).is_file() and not resume:
        if not _started(out):
            logger.info(
                "output_dir %s holds a run that stopped before its first checkpoint: starting it again",
                out,
            )
        # moved aside, not deleted: alm's files of the old run go once the new student is saved
        move_aside(out, _OUR_ENTRIES)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_files(cfg, student_family)
    return changes
