"""The reproduction study (issue 14, docs/reproduction.md): every recipe it uses loads and validates, every run of
the plan resolves to a valid training recipe that differs from its student's base only where the study says, and
(slow tier) a shortened run of the same command goes end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alm.config.load import load_yaml_model
from alm.config.precompute import load_precompute_recipe
from alm.config.train import LossConfig, TrainRecipe
from alm.data.specs import load_data_spec

REPO = Path(__file__).resolve().parents[1]


def _reproduce_module():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [False, True])
def test_every_run_of_the_study_resolves_to_a_valid_recipe(quick: bool, tmp_path: Path) -> None:
    reproduce = _reproduce_module()
    study = reproduce.load_study()
    for recipe in study.precompute.values():
        load_precompute_recipe(REPO / recipe)
    runs = reproduce.run_plan(study, tmp_path, quick)
    names = {(r["student"], r["name"]) for r in runs}
    assert {("bytes", m) for m in ("sft", "alm", "alm+sft", "alm_no_debias")} <= names
    assert {("bpe", m) for m in ("sft", "alm", "alm+sft")} <= names
    if not quick:
        assert {("bpe", f"{m}_lr{f}") for m in ("sft", "alm") for f in ("0.333", "3")} <= names
        swept = set(study.lr_sweep["students"])
        assert not any("_lr" in name for student, name in names if student not in swept)
    bases = {}
    for run in runs:
        overrides = run["overrides"]
        if (
            any(o.startswith("loss.debias") for o in overrides)
            and "debias" not in LossConfig.model_fields
        ):
            continue  # loss.debias lands with issue 8; the driver skips the run until then
        cfg = load_yaml_model(TrainRecipe, REPO / run["recipe"], overrides)
        assert cfg.output_dir == str(run["output_dir"])
        assert cfg.optim.lr == pytest.approx(run["lr"])
        # same init, data, seed and steps for every method of a student
        key = cfg.model_dump(include={"student", "stores", "seed", "optim", "eval"})
        key["optim"].pop("lr")
        bases.setdefault(run["student"], key)
        assert key == bases[run["student"]], run["name"]


@pytest.mark.parametrize(
    "study_file", sorted((REPO / "stages").glob("repro_study*.yaml")), ids=lambda p: p.name
)
def test_every_study_file_resolves_to_valid_recipes(study_file: Path, tmp_path: Path) -> None:
    reproduce = _reproduce_module()
    study = reproduce.load_study(study_file)
    runs = reproduce.run_plan(study, tmp_path, False)
    assert runs
    for run in runs:
        cfg = load_yaml_model(TrainRecipe, REPO / run["recipe"], run["overrides"])
        assert cfg.output_dir == str(run["output_dir"])
        assert cfg.optim.steps >= cfg.optim.warmup_steps


def test_out_of_domain_text_is_in_no_training_store() -> None:
    spec = load_data_spec(REPO / "data_specs" / "licenses_ood.yaml")
    assert spec.sources[0].type == "text"
    for recipe in ("repro_precompute.yaml", "repro_precompute_heldout.yaml"):
        assert "licenses" not in load_precompute_recipe(REPO / "stages" / recipe).data.spec


@pytest.mark.slow
def test_shortened_reproduction_runs_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    docs = tmp_path / "docs"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "reproduce.py"),
            "--quick",
            "--root",
            str(tmp_path),
            "--docs",
            str(docs),
        ],
        cwd=REPO,
        env=env,
        check=True,
        timeout=3000,
    )
    summary = json.loads((docs / "reproduction.json").read_text())
    assert summary["settings"]["quick"] is True
    for student in ("bytes", "bpe"):
        data = summary["students"][student]
        assert data["runs"], student
        for row in data["runs"]:
            for eval_set in ("in_domain", "out_of_domain"):
                assert 0 < row[eval_set]["bits_per_byte"] < 50
        assert (docs / f"{student}.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        summary["teacher"]["out_of_domain"]["bits_per_byte"]
        < summary["students"]["bytes"]["init"]["out_of_domain"]["bits_per_byte"]
    )
    assert "| teacher |" in (docs / "reproduction.md").read_text()
