"""Helpers shared by the stage-two tests (recipes, paths, real child processes); fixtures are in `conftest.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
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


def child_env(log_level: str = "INFO") -> dict[str, str]:
    """The environment of an `alm` or `torchrun` child process: offline, one torch thread, this checkout
    importable, `ALM_LOG_LEVEL` set."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "ALM_LOG_LEVEL": log_level,
    }


def run_alm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`alm ARGS...` in a real process from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "alm.cli", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Run every recipe given on the command line, one after another, in one (torchrun-launched) process group.
_TRAIN_ALL = (
    "import sys; from alm.config import load_yaml_model; from alm.config.train import TrainRecipe; "
    "from alm.train import parallel; from alm.train.loop import run_train\n"
    "for path in sys.argv[1:]: run_train(load_yaml_model(TrainRecipe, path))\n"
    "parallel.shutdown()"
)


def torchrun_train_all(
    recipes: Sequence[Path], *, port: int, timeout: float, nproc: int = 2
) -> subprocess.CompletedProcess:
    """Train `recipes` one after another on `nproc` real processes (torchrun, gloo on CPU), in one launch."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return subprocess.run(
        [*launcher, "--master-port", str(port), "--no-python", sys.executable, "-c", _TRAIN_ALL]
        + [str(path) for path in recipes],
        cwd=REPO,
        env=child_env("WARNING"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
