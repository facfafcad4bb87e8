"""The run folder of `alm train`: what is in it and the rules for reusing it (docs/training.md "Outputs").

Owns `RUN_FILE`, `STUDENT_DIR`, `prepare_output_dir` and `student_dir`. A new or empty folder starts a run; a
folder holding one of our runs is refused unless resumed or overwritten (then only our own entries are replaced);
a non-empty folder that is not an alm run is always refused and never touched (STYLE.md §4).
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
from alm.train.checkpoint import CHECKPOINTS_DIR
from alm.train.log import LOG_FILE, METRICS_FILE

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
        # moved aside, not deleted: alm's files of the old run go once the new student is saved
        move_aside(out, _OUR_ENTRIES)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(
        yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
    )
    run_file.write_text(
        json.dumps({"kind": "alm-train-run", "config_hash": config_hash(cfg)}, indent=2) + "\n"
    )
    return out
