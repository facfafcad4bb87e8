"""The training recipe schema: defaults from ALM_SPEC §6-§8, every problem reported at once, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.errors import ConfigError

MINIMAL = {
    "stores": ["runs/x/store"],
    "student": {"model": "some/model"},
    "optim": {"steps": 10},
    "output_dir": "runs/x/student",
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_follow_the_paper(tmp_path):
    recipe = load_yaml_model(TrainRecipe, write(tmp_path, MINIMAL))
    assert recipe.loss.kind == "alm" and recipe.loss.gamma == 0.1 and recipe.loss.temperature == 100
    assert recipe.loss.divergence == "binary_ce" and recipe.loss.debias is True
    assert recipe.loss.boundary_class_ids() == [0, 1, 2, 4]  # space+tab+newline+special (§5.2)
    assert recipe.optim.betas == (0.9, 0.95) and recipe.optim.grad_clip == 1.0
    assert recipe.stores[0].path == "runs/x/store" and recipe.lora is None
    assert recipe.parallel == "ddp" and recipe.precision == "auto"


def test_typos_and_bad_values_are_all_reported_at_once(tmp_path):
    bad = {
        **MINIMAL,
        "optim": {"steps": 10, "lr": -1, "micro_batch_sise": 4},
        "loss": {"kind": "almm", "gama": 0.1},
        "seeed": 1,
    }
    with pytest.raises(ConfigError) as err:
        load_yaml_model(TrainRecipe, write(tmp_path, bad))
    message = str(err.value)
    for needle in ("optim.lr", "optim.micro_batch_sise", "loss.kind", "loss.gama", "seeed"):
        assert needle in message, needle
    assert "5 problem(s)" in message


def test_student_needs_exactly_one_of_model_or_transfer(tmp_path):
    both = {
        **MINIMAL,
        "student": {"model": "m", "transfer": {"from": "teacher", "tokenizer": "bytes"}},
    }
    with pytest.raises(ConfigError, match=r"exactly one of student\.model"):
        load_yaml_model(TrainRecipe, write(tmp_path, both))
    transfer = {**MINIMAL, "student": {"transfer": {"from": "teacher", "untie_embeddings": True}}}
    recipe = load_yaml_model(TrainRecipe, write(tmp_path, transfer))
    assert (
        recipe.student.transfer.from_ == "teacher" and recipe.student.transfer.tokenizer == "bytes"
    )


def test_cross_field_rules(tmp_path):
    bad = {
        **MINIMAL,
        "optim": {"steps": 10, "warmup_steps": 20},
        "loss": {"hidden": 1.0},
        "lora": {"r": 8},
    }
    with pytest.raises(ConfigError) as err:
        load_yaml_model(TrainRecipe, write(tmp_path, bad))
    assert "warmup_steps (20) exceeds optim.steps (10)" in str(err.value)
    assert "loss.hidden needs full fine-tuning" in str(err.value)


def test_overrides_apply_before_validation(tmp_path):
    recipe = load_yaml_model(
        TrainRecipe, write(tmp_path, MINIMAL), ["optim.lr=3e-4", "loss.kind=alm+sft"]
    )
    assert recipe.optim.lr == 3e-4 and recipe.loss.losses() == ["alm", "sft"]
