"""The same objective on 1 and 2 processes: losses x layouts x accumulation (ISSUE 8 defects 1-2, STYLE.md §7).

Every loss configuration users run (`alm`, `sft`, `alm+sft` with GradMag, `alm` with the hidden-state loss) trains
for 2 steps of 2 accumulated micro-batches on one process (micro-batches of 4) and on two processes under DDP and
FSDP2 (micro-batches of 2 per process): the loader gives both layouts the same global micro-batches, so per-step
losses, every logged metric and the final weights must agree to float tolerance, and GradMag's weights must be the
global micro-batch's (never the silent 1.0 of a missing gradient). One torchrun launch trains all eight
two-process runs, to pay the start-up once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from tolerance import assert_fp32_close
from train_helpers import torchrun_train_all, train_recipe

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.train.log import read_metrics
from alm.train.loop import run_train

LOSSES = {
    "alm": {"kind": "alm"},
    "sft": {"kind": "sft"},
    "alm+sft": {"kind": "alm+sft"},
    "alm+hidden": {"kind": "alm", "hidden": 1.0},
}
LAYOUTS = ("ddp", "fsdp2")
# Metrics that describe the step, not the process or the clock.
_NOT_COMPARED = {"step", "tokens_per_s", "lr"}


# Trains each recipe named on the command line in turn, in one process group.
def _recipe(tmp_path: Path, name: str, stores, student_dir, loss: dict, **changes) -> Path:
    settings = {"optim__steps": 2, "optim__grad_accum": 2, "optim__warmup_steps": 0, **changes}
    return train_recipe(
        tmp_path / f"{name}.yaml",
        store=stores["train"],
        output=tmp_path / name,
        student={"model": str(student_dir)},
        loss=loss,
        **settings,
    )


def _step_records(output: Path) -> list[dict]:
    return [r for r in read_metrics(output) if "loss" in r]


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory, stores, student_dir) -> Path:
    root = tmp_path_factory.mktemp("parity")
    two_process = []
    for name, loss in LOSSES.items():
        one = _recipe(root, f"{name}-one", stores, student_dir, loss, optim__micro_batch_size=4)
        run_train(load_yaml_model(TrainRecipe, one))
        for layout in LAYOUTS:
            two_process.append(
                _recipe(
                    root,
                    f"{name}-{layout}",
                    stores,
                    student_dir,
                    loss,
                    optim__micro_batch_size=2,
                    parallel=layout,
                )
            )
    result = torchrun_train_all(two_process, port=29531, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_processes_log_the_same_steps_and_train_the_same_weights_as_one(
    parity_runs, loss, layout
):
    one = _step_records(parity_runs / f"{loss}-one")
    two = _step_records(parity_runs / f"{loss}-{layout}")
    assert len(one) == len(two) == 2
    for record_one, record_two in zip(one, two, strict=True):
        assert record_one.keys() == record_two.keys()
        for key in sorted(record_one.keys() - _NOT_COMPARED):
            # Losses of 2 steps: a few hundred fp32 roundings apart (other reduction order), still tiny.
            assert_fp32_close(record_two[key], record_one[key], ulps=4096)
    weights_one = load_file(parity_runs / f"{loss}-one" / "student" / "model.safetensors")
    weights_two = load_file(parity_runs / f"{loss}-{layout}" / "student" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, value in weights_one.items():
        assert_fp32_close(weights_two[key].numpy(), value.numpy(), ulps=4096, scale=0.1)


@pytest.mark.parametrize("layout", ["one", *LAYOUTS])
def test_gradmag_weights_are_measured_never_the_fallback_one(parity_runs, layout):
    for record in _step_records(parity_runs / f"alm+sft-{layout}"):
        weights = [record["gradmag_weight_alm"], record["gradmag_weight_sft"]]
        assert all(np.isfinite(w) and w > 0 and w != 1.0 for w in weights), record
        # SFT's gradient is much larger than ALM's at tau = 100, so their weights differ by orders of magnitude
        assert record["gradmag_weight_alm"] > 10 * record["gradmag_weight_sft"], record
    for record in _step_records(parity_runs / f"alm+hidden-{layout}"):
        assert record["gradmag_weight_alm"] > 0 and record["gradmag_weight_hidden"] > 0, record


@pytest.mark.parametrize("loss", ["alm", "alm+sft"])
def test_one_by_four_and_two_by_two_accumulation_log_the_same_per_loss_values(
    tmp_path, stores, student_dir, loss
):
    # The same 4 sequences per step as one micro-batch of 4 or two of 2: per-loss values are shares of the step's
    # global mean, so their sums agree. GradMag weights are the global micro-batch's (docs/training.md), so under
    # alm+sft the split changes the weights and with them the update: only the first step's values must agree.
    runs = {}
    for micro_batch_size, accum in ((4, 1), (2, 2)):
        name = f"{loss}-{micro_batch_size}x{accum}"
        recipe = _recipe(
            tmp_path,
            name,
            stores,
            student_dir,
            LOSSES[loss],
            optim__micro_batch_size=micro_batch_size,
            optim__grad_accum=accum,
        )
        run_train(load_yaml_model(TrainRecipe, recipe))
        runs[accum] = _step_records(tmp_path / name)
    compared = {"alm", "sft", "alm_abs_logp_diff", "num_groups"}
    steps = 2 if loss == "alm" else 1
    for record_one, record_two in zip(runs[1][:steps], runs[2][:steps], strict=True):
        for key in sorted(compared & record_one.keys()):
            assert_fp32_close(record_two[key], record_one[key], ulps=4096)
        if loss == "alm":
            assert_fp32_close(record_two["loss"], record_one["loss"], ulps=4096)
    if loss == "alm+sft":
        weights = [r["gradmag_weight_alm"] for r in (runs[1][0], runs[2][0])]
        assert all(w > 0 and w != 1.0 for w in weights)
