"""Training features users of transformers/TRL expect (issue 10 item 8): learning-rate schedules by name,
gradient checkpointing, the saved student's dtype, checkpoint retention in steps or time, and `push_to_hub`
(against a Hub client that writes into a local folder: nothing contacts a hub).

References are written from the definitions (the schedule formulas of transformers' docs, orbax's retention
rules), not from the implementation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tolerance import assert_fp32_close
from train_helpers import train_recipe

from alm.config import load_yaml_model
from alm.config.train import OptimConfig, TrainRecipe
from alm.errors import BackendUnavailableError, ConfigError
from alm.train.checkpoint import list_checkpoints, retained_checkpoints
from alm.train.log import read_metrics
from alm.train.loop import run_train
from alm.train.step import lr_factor


def train(tmp_path: Path, name: str, **kwargs) -> Path:
    recipe = train_recipe(tmp_path / f"{name}.yaml", output=tmp_path / name, **kwargs)
    run_train(load_yaml_model(TrainRecipe, recipe))
    return tmp_path / name


def reference_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The schedules from their definitions; warmup ends on the peak: (step + 1) / warmup."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    match kind:
        case "linear":
            return 1.0 - progress
        case "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        case "constant_with_warmup":
            return 1.0
        case "cosine_with_min_lr":  # min_lr_rate 0.1: cosine between 1 and 0.1
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"]
)
def test_schedules_follow_their_definitions(kind):
    kwargs = {"min_lr_rate": 0.1} if kind == "cosine_with_min_lr" else {}
    optim = OptimConfig(
        steps=10, warmup_steps=3, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs
    )
    factor = lr_factor(optim)
    got = [factor(step) for step in range(10)]
    want = [reference_factor(kind, step, 3, 10) for step in range(10)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert min(got[:3]) > 0  # no step runs at lr 0


def test_schedule_arguments_that_do_not_fit_are_one_config_error():
    with pytest.raises(ConfigError, match="min_lr"):
        lr_factor(OptimConfig(steps=10, lr_scheduler_type="cosine_with_min_lr"))
    with pytest.raises(ConfigError, match="bogus"):
        lr_factor(OptimConfig(steps=10, lr_scheduler_kwargs={"bogus": 1}))


def test_a_run_logs_the_cosine_rate_and_resumes_it_exactly(tmp_path, stores, student_dir):
    common = {
        "store": stores["heldout"],
        "student": {"model": str(student_dir)},
        "optim__steps": 4,
        "optim__warmup_steps": 1,
        "optim__lr_scheduler_type": "cosine",
    }
    full = train(tmp_path, "full", **common)
    lrs = [r["lr"] for r in read_metrics(full) if "lr" in r]
    want = [3e-3 * reference_factor("cosine", s, 1, 4) for s in range(4)]
    np.testing.assert_allclose(lrs, want, rtol=1e-12, atol=0)

    part = tmp_path / "part.yaml"
    train_recipe(part, output=tmp_path / "part", stop_after_steps=2, **common)
    run_train(load_yaml_model(TrainRecipe, part))
    run_train(load_yaml_model(TrainRecipe, part, ["stop_after_steps=null"]), resume=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "part") if "loss" in r] == [
        r["loss"] for r in read_metrics(full) if "loss" in r
    ]


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, stores, student_dir, monkeypatch):
    import transformers.modeling_utils

    calls = []  # each checkpointed block call: the blocks really are recomputed
    checkpoint = transformers.modeling_utils.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    common = {
        "store": stores["heldout"],
        # GradMag takes gradients on the last block: it must see them with checkpointing too
        "loss": {"kind": "alm+sft"},
        "optim__steps": 3,
    }
    plain = train(tmp_path, "plain", student={"model": str(student_dir)}, **common)
    assert calls == []
    recomputed = train(
        tmp_path,
        "ckpt",
        student={"model": str(student_dir), "gradient_checkpointing": True},
        **common,
    )
    assert calls and set(calls) == {False}  # non-reentrant
    for a, b in zip(read_metrics(plain), read_metrics(recomputed), strict=True):
        for key in ("loss", "alm_raw", "sft", "grad_norm"):
            if key in a:
                assert_fp32_close(b[key], a[key])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recomputed / "student")
    assert model.config.use_cache  # saved for generation, not as trained
    reference = AutoModelForCausalLM.from_pretrained(plain / "student").state_dict()
    for key, value in model.state_dict().items():
        assert_fp32_close(
            value.numpy(), reference[key].numpy(), scale=float(reference[key].abs().max())
        )


def test_the_student_is_saved_in_the_chosen_dtype(tmp_path, stores, student_dir):
    out = train(
        tmp_path,
        "bf16",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=1,
        save_dtype="bf16",
    )
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with safe_open(str(out / "student" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    # the checkpoint keeps fp32 master weights; the default on CPU (`auto`) saves fp32
    fp32 = train(
        tmp_path,
        "auto",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=1,
    )
    assert json.loads((fp32 / "student" / "config.json").read_text())["dtype"] == "float32"
    from transformers import AutoModelForCausalLM

    half = AutoModelForCausalLM.from_pretrained(out / "student", dtype="auto")
    assert half.dtype == torch.bfloat16
    full = AutoModelForCausalLM.from_pretrained(fp32 / "student").state_dict()
    for key, value in half.state_dict().items():  # the same weights, rounded to bf16
        assert torch.equal(value, full[key].to(torch.bfloat16)), key


def reference_retained(saved, keep, every_steps=None, every_minutes=None):
    """orbax's CheckpointManager rules: the newest `keep`, every multiple of `every_steps`, and walking from the
    oldest, each checkpoint at least `every_minutes` after the last one kept by time."""
    steps = [s for s, _ in sorted(saved)]
    kept = set(steps[len(steps) - keep :])
    if every_steps:
        kept.update(s for s in steps if s % every_steps == 0)
    if every_minutes:
        anchor = None
        for step, at in sorted(saved):
            if anchor is None or at >= anchor + 60 * every_minutes:
                kept.add(step)
                anchor = at
    return kept


def test_retention_keeps_the_newest_and_every_nth_or_every_interval():
    saved = [(step, 100.0 + 240.0 * step) for step in range(1, 11)]  # one every 4 minutes
    assert retained_checkpoints(saved, keep=2) == {9, 10}
    assert retained_checkpoints(saved, keep=2, every_steps=4) == {4, 8, 9, 10}
    # every 10 minutes: steps 1, 4 (12 min later), 7, 10
    assert retained_checkpoints(saved, keep=1, every_minutes=10) == {1, 4, 7, 10}
    for keep in (1, 3):
        for every_steps in (None, 3):
            for every_minutes in (None, 7.5):
                assert retained_checkpoints(
                    saved, keep=keep, every_steps=every_steps, every_minutes=every_minutes
                ) == reference_retained(saved, keep, every_steps, every_minutes)


def test_a_run_keeps_the_checkpoints_its_retention_names(tmp_path, stores, student_dir):
    out = train(
        tmp_path,
        "run",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=5,
        checkpoint_every=1,
        keep_checkpoints=1,
        keep_checkpoint_every_steps=2,
    )
    assert [p.name for p in list_checkpoints(out)] == [
        "step-00000002",
        "step-00000004",
        "step-00000005",
    ]


class LocalHub:
    """A stand-in for `huggingface_hub.HfApi` that writes repos into a local folder."""

    root: Path
    calls: ClassVar[list[tuple]] = []

    def create_repo(self, repo_id, *, private, exist_ok, repo_type):
        LocalHub.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        (LocalHub.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, *, folder_path, repo_id, repo_type, commit_message):
        LocalHub.calls.append(("upload_folder", repo_id, repo_type, commit_message))
        shutil.copytree(folder_path, LocalHub.root / repo_id, dirs_exist_ok=True)
        return f"file://{LocalHub.root / repo_id}"


def test_push_to_hub_uploads_the_final_student(tmp_path, stores, student_dir, monkeypatch):
    import huggingface_hub

    LocalHub.root, LocalHub.calls = tmp_path / "hub", []
    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = train(
        tmp_path,
        "run",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        optim__steps=1,
        push_to_hub=True,
        hub_model_id="me/tiny-student",
        hub_private_repo=True,
    )
    assert LocalHub.calls[0] == ("create_repo", "me/tiny-student", True, True, "model")
    pushed = LocalHub.root / "me" / "tiny-student"
    assert sorted(p.name for p in pushed.iterdir()) == sorted(
        p.name for p in (out / "student").iterdir()
    )
    for path in (out / "student").iterdir():
        assert (pushed / path.name).read_bytes() == path.read_bytes()


def test_push_to_hub_is_refused_offline_or_without_a_repo(tmp_path, monkeypatch):
    base = {"stores": ["s"], "student": {"model": "m"}, "optim": {"steps": 1}, "output_dir": "o"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as err:
        TrainRecipe.model_validate({**base, "push_to_hub": True, "hub_model_id": "me/x"})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ValueError, match="needs hub_model_id") as err:
        TrainRecipe.model_validate({**base, "push_to_hub": True})
    assert "HF_HUB_OFFLINE" not in str(err.value)


def test_a_failed_push_says_where_the_student_is(tmp_path, monkeypatch):
    import huggingface_hub

    from alm.train.student import push_student

    class Unreachable(LocalHub):
        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(BackendUnavailableError, match="hf upload me/x") as err:
        push_student(tmp_path, "me/x", private=False)
    assert "no route to host" in str(err.value) and str(tmp_path) in str(err.value)
