"""Every training recipe in `stages/` loads and validates (STYLE.md §5: lit's config-hub test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe

STAGES = Path(__file__).resolve().parents[2] / "stages"
# Training recipes: `*train*.yaml` and the paper setups (`paper_*.yaml` that are not precompute recipes).
TRAIN_RECIPES = sorted(
    p
    for p in STAGES.glob("*.yaml")
    if "precompute" not in p.name and ("train" in p.name or p.name.startswith("paper_"))
)


def test_there_are_train_recipes_for_the_demo_and_the_three_paper_setups():
    names = {p.name for p in TRAIN_RECIPES}
    assert {
        "demo_train.yaml",
        "paper_llama3_to_qwen2.yaml",
        "paper_llama3_to_bytes.yaml",
        "paper_openmath2_to_gemma2.yaml",
    } <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_train_recipe_loads_and_validates(path: Path):
    recipe = load_yaml_model(TrainRecipe, path)
    assert recipe.optim.steps >= recipe.optim.warmup_steps
    assert recipe.stores


def test_paper_recipes_carry_the_papers_hyperparameters():
    qwen2 = load_yaml_model(TrainRecipe, STAGES / "paper_llama3_to_qwen2.yaml")
    assert qwen2.lora is not None and (qwen2.lora.r, qwen2.lora.alpha) == (64, 64)
    assert qwen2.student.transfer is not None and qwen2.student.transfer.special_tokens == "teacher"
    assert (
        qwen2.loss.kind == "alm+sft" and qwen2.loss.gamma == 0.1 and qwen2.loss.temperature == 100
    )
    to_bytes = load_yaml_model(TrainRecipe, STAGES / "paper_llama3_to_bytes.yaml")
    assert to_bytes.lora is None and to_bytes.loss.losses() == ["alm", "sft", "hidden"]
    assert to_bytes.student.transfer is not None and to_bytes.student.transfer.tokenizer == "bytes"
    assert to_bytes.student.transfer.untie_embeddings and to_bytes.student.max_length == 2048
    math = load_yaml_model(TrainRecipe, STAGES / "paper_openmath2_to_gemma2.yaml")
    assert math.optim.lr == 5e-6 and math.optim.steps == 5000 and math.optim.grad_clip is None
    assert math.optim.weight_decay == 0.0 and math.lora is None
