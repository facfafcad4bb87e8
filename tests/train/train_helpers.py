"""Helpers shared by the stage-two tests (recipes, paths); fixtures are in `conftest.py`."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DATA_SPEC = REPO / "data_specs" / "stdlib_docs.yaml"
TOPK_STORE_K = 16  # the top-k of `conftest.py`'s `topk_stores`


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def precompute(
    root: Path,
    teacher: Path,
    name: str,
    *,
    split: str,
    limit: int,
    hidden: bool,
    precision: str | None = None,
    top_k: int = 0,
) -> Path:
    from alm.precompute import run_precompute

    recipe = {
        "teacher": {"model": str(teacher), "backend": "hf", "device": "cpu", "dtype": "float32"},
        "data": {"spec": str(DATA_SPEC), "split": split, "limit": limit},
        "output": str(root / name),
        "max_length": 48,
        "token_budget": 512,
        "row_chunk": 64,
        "hidden_states": hidden,
        "shard_size": 4,
        "top_k": top_k,
    }
    if (
        precision is not None
    ):  # `exact` keeps fp32 logp bit for bit (the default store rounds, docs/store.md)
        recipe["precision"] = precision
    run_precompute(write_yaml(root / f"{name}.yaml", recipe), shard="0/1")
    return root / name


def train_recipe(path: Path, *, store: Path, output: Path, student: dict, **changes) -> Path:
    """A small training recipe; `changes` use `__` for nesting (`optim__steps=3`)."""
    recipe: dict = {
        "stores": [{"path": str(store)}],
        "student": {**student, "max_length": student.get("max_length", 64)},
        "loss": {"kind": "alm"},
        "optim": {
            "lr": 3e-3,
            "steps": 4,
            "warmup_steps": 0,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "weight_decay": 0.0,
        },
        "output_dir": str(output),
        "seed": 0,
        "num_workers": 0,
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return write_yaml(path, recipe)
