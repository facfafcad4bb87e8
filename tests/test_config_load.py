"""`alm.config.load`: YAML + `--set` overrides (dotted paths, list indices) + one aggregated ConfigError."""

from __future__ import annotations

import pytest
from pydantic import Field

from alm.config import StrictModel, apply_overrides, load_yaml_model, parse_overrides
from alm.errors import ConfigError


class Inner(StrictModel):
    lr: float = Field(1e-5, gt=0)
    steps: int = Field(ge=1)


class Recipe(StrictModel):
    name: str
    optim: Inner
    stores: list[str] = Field(default_factory=list)


def test_overrides_parse_values_as_yaml_scalars():
    assert parse_overrides(["a.b=3e-4", "c=true", "d=[1, 2]", "e=text", "f="]) == {
        "a.b": 3e-4,
        "c": True,
        "d": [1, 2],
        "e": "text",
        "f": "",
    }


def test_override_without_equals_sign_is_refused_with_an_example():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["optim.lr"])


def test_overrides_create_nested_keys_and_index_lists():
    data = {"stores": [{"path": "a"}, "b"], "optim": {"lr": 1}}
    out = apply_overrides(
        data, {"stores.0.path": "x", "stores.1.path": "y", "optim.steps": 3, "n.k": 1}
    )
    assert out == {
        "stores": [{"path": "x"}, {"path": "y"}],
        "optim": {"lr": 1, "steps": 3},
        "n": {"k": 1},
    }
    assert data["stores"][0] == {"path": "a"}  # the input is left untouched


def test_list_index_out_of_range_names_the_list_and_its_length():
    with pytest.raises(ConfigError, match="stores is a list of 1 item"):
        apply_overrides({"stores": [{"path": "a"}]}, {"stores.2.path": "x"})


def test_every_problem_is_reported_at_once_with_its_dotted_path(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: demo\noptim:\n  lr: -1\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml_model(Recipe, path)
    message = str(err.value)
    assert str(path) in message
    assert "optim.lr" in message and "got -1" in message
    assert "optim.stepz: unknown key (typo?)" in message
    assert "optim.steps" in message and "required" in message.lower()


def test_set_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: demo\noptim: {steps: 3}\nstores: [a, b]\n")
    recipe = load_yaml_model(Recipe, path, ["optim.lr=0.5", "stores.1=c"])
    assert recipe.optim.lr == 0.5 and recipe.stores == ["a", "c"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [("a: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping")],
)
def test_malformed_files_are_refused_clearly(tmp_path, content, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=problem):
        load_yaml_model(Recipe, path)


def test_missing_file_names_the_path():
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_yaml_model(Recipe, "nope.yaml")
