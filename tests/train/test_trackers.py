"""Experiment trackers (`report_to`, issue 10 item 7): TensorBoard and Weights & Biases get the logged scalars,
W&B offline only (`WANDB_MODE=offline`: nothing contacts a server), and a tracker whose package is missing is one
clear error when the recipe is loaded, never skipped silently.

The TensorBoard and W&B runs are skipped where the package is not installed (`pip install 'alm[tensorboard]'`,
`'alm[wandb]'`); the refusal is tested everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, train_recipe

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.errors import ConfigError
from alm.train.log import read_metrics
from alm.train.loop import run_train

BASE = {"stores": ["s"], "student": {"model": "m"}, "optim": {"steps": 1}, "output_dir": "o"}


def test_report_to_reads_like_transformers():
    assert TrainRecipe.model_validate(BASE).report_to == []
    assert TrainRecipe.model_validate({**BASE, "report_to": "none"}).report_to == []
    if importlib.util.find_spec("tensorboard") is not None:
        assert TrainRecipe.model_validate({**BASE, "report_to": "tensorboard"}).report_to == [
            "tensorboard"
        ]


def test_a_tracker_that_is_not_installed_is_one_error_at_load_time(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without_wandb(name, *args):
        return None if name == "wandb" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_wandb)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({**BASE, "report_to": ["wandb"]}))
    with pytest.raises(ConfigError, match=r"pip install 'alm\[wandb\]'") as err:
        load_yaml_model(TrainRecipe, recipe)
    assert "report_to" in str(err.value)


def test_an_unknown_tracker_is_refused_through_the_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(BASE))
    result = subprocess.run(
        [sys.executable, "-m", "alm.cli", "train", str(recipe), "--set", "report_to=[mlflow]"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert "report_to" in result.stderr and "wandb" in result.stderr


def train(tmp_path: Path, name: str, **kwargs) -> Path:
    recipe = train_recipe(tmp_path / f"{name}.yaml", output=tmp_path / name, **kwargs)
    run_train(load_yaml_model(TrainRecipe, recipe))
    return tmp_path / name


def test_tensorboard_gets_every_logged_scalar(tmp_path, stores, student_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(
        tmp_path,
        "run",
        store=stores["train"],
        student={"model": str(student_dir)},
        optim__steps=3,
        eval={"store": str(stores["heldout"])},
        report_to=["tensorboard"],
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_metrics(out)
    for key in ("loss", "lr", "grad_norm", "eval/student_bpb"):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want]
        # TensorBoard stores float32
        assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want))


def test_no_tracker_writes_nothing_of_theirs(tmp_path, stores, student_dir):
    out = train(
        tmp_path,
        "run",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=1,
    )
    assert not (out / "tensorboard").exists() and not (out / "wandb").exists()


@pytest.mark.slow  # two CLI runs and W&B's service process: ~100 s on the 2-core machine
def test_wandb_offline_logs_the_run_and_a_resume_continues_it(tmp_path, stores, student_dir):
    pytest.importorskip("wandb")
    recipe = train_recipe(
        tmp_path / "r.yaml",
        output=tmp_path / "run",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=3,
        stop_after_steps=2,
        report_to="wandb",
    )
    env = {
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "alm-tests",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    for extra in ([], ["--resume", "--set", "stop_after_steps=null"]):
        result = subprocess.run(
            [sys.executable, "-m", "alm.cli", "train", str(recipe), *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**_inherited_env(), **env},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    run_id = (out / "wandb" / "alm-run-id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(
        r.name.endswith(f"-{run_id}") for r in runs
    )  # one W&B run, resumed
    for run in runs:  # W&B's record log (protobuf) of each part holds the logged keys
        records = (run / f"run-{run_id}.wandb").read_bytes()
        assert b"loss" in records and b"grad_norm" in records and b"alm-tests" in records


def _inherited_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
