"""Every precompute recipe in `stages/` loads and validates, with its data spec (no model, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alm.config.precompute import PrecomputeRecipe, load_precompute_recipe
from alm.errors import ConfigError
from alm.precompute import _resolve_spec_path
from alm.teacher.default import BUILTIN_PREFIX, BUILTIN_TEACHERS, is_builtin

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "stages").glob("*precompute*.yaml"))


def test_the_demo_and_paper_precompute_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {
        "demo_precompute.yaml",
        "demo_precompute_heldout.yaml",
        "paper_llama3_precompute.yaml",
        "paper_openmath2_precompute.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_precompute_recipe_loads_and_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alm.data.specs import load_data_spec

    monkeypatch.chdir(REPO)
    recipe = load_precompute_recipe(path)
    assert isinstance(recipe, PrecomputeRecipe)
    if is_builtin(recipe.teacher.model):
        assert recipe.teacher.model.removeprefix(BUILTIN_PREFIX) in BUILTIN_TEACHERS
    assert isinstance(recipe.data.spec, str)
    spec = load_data_spec(_resolve_spec_path(recipe.data.spec, path))
    assert spec.name
    assert recipe.max_length >= 2 and recipe.shard_size >= 1


def test_demo_recipes_run_on_cpu_and_read_disjoint_splits() -> None:
    train = load_precompute_recipe(REPO / "stages" / "demo_precompute.yaml")
    heldout = load_precompute_recipe(REPO / "stages" / "demo_precompute_heldout.yaml")
    assert train.teacher.backend == heldout.teacher.backend == "hf"
    assert train.data.split == "train" and heldout.data.split == "heldout"
    assert train.output != heldout.output


def test_overrides_apply_before_validation() -> None:
    recipe = load_precompute_recipe(
        REPO / "stages" / "demo_precompute.yaml", ["max_length=64", "teacher.device=cpu", "top_k=5"]
    )
    assert (recipe.max_length, recipe.teacher.device, recipe.top_k) == (64, "cpu", 5)
    with pytest.raises(ConfigError, match="max_length"):
        load_precompute_recipe(REPO / "stages" / "demo_precompute.yaml", ["max_length=1"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["teacher.device=cpu"], "GPUs only"),
        (["hidden_states=true"], "backend: hf"),
        (["top_k=50"], "num_logprobs"),
    ],
)
def test_vllm_recipe_rules(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_precompute_recipe(REPO / "stages" / "paper_llama3_precompute.yaml", overrides)
