"""Baselines, the n-gram byte student and the embedding projector on 1 and 2 processes (FSDP2), and under LoRA.

As `test_parallel_parity.py` does for ALM and SFT: each configuration trains 2 steps of 2 accumulated
micro-batches on one process (micro-batches of 4) and on two processes under FSDP2 (gloo, micro-batches of 2 per
process); the loader gives both layouts the same global micro-batches, so every logged value and the final
weights must agree to fp32 tolerance. The configurations: `uld+sft` and `mined+sft` (GradMag, the default
combination) and `topk_kd` from a top-16 store; the byte student with n-gram input embeddings (`alm+sft`); a BPE
transfer with the `mlp` embedding projector (`alm+sft`). The same configurations with LoRA (r 4) train on one
process and save merged students that transformers loads, and agree with two processes under DDP (the recipe
refuses LoRA with FSDP2). One torchrun launch trains every two-process run. `slow`: about 3 minutes on the
2-core machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tolerance import assert_fp32_close
from train_helpers import torchrun_train_all, train_recipe

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.train.log import read_metrics
from alm.train.loop import run_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

_NOT_COMPARED = {"step", "tokens_per_s", "lr"}  # the process and the clock, not the step
LORA = {"r": 4, "alpha": 8}


def _configurations(topk_stores, stores, student_dir, same_tokenizer_student) -> dict[str, dict]:
    byte_ngram = {
        "transfer": {
            "from": "teacher",
            "tokenizer": "bytes",
            "untie_embeddings": True,
            "ngram_embeddings": True,
        },
        "max_length": 96,
    }
    projector = {
        "transfer": {
            "from": "teacher",
            "tokenizer": str(student_dir),
            "untie_embeddings": True,
            "embedding_projector": "mlp",
        }
    }
    return {
        "uld+sft": {
            "store": topk_stores["train"],
            "student": {"model": str(student_dir)},
            "loss": {"kind": "uld+sft"},
        },
        "mined+sft": {
            "store": topk_stores["train"],
            "student": {"model": str(student_dir)},
            "loss": {"kind": "mined+sft"},
        },
        "topk_kd": {
            "store": topk_stores["train"],
            "student": {"model": str(same_tokenizer_student)},
            "loss": {"kind": "topk_kd"},
        },
        "ngram": {"store": stores["plain"], "student": byte_ngram, "loss": {"kind": "alm+sft"}},
        "projector": {"store": stores["plain"], "student": projector, "loss": {"kind": "alm+sft"}},
    }


NAMES = ("uld+sft", "mined+sft", "topk_kd", "ngram", "projector")


def _recipe(root: Path, name: str, config: dict, **changes) -> Path:
    settings = {"optim__steps": 2, "optim__grad_accum": 2, "optim__warmup_steps": 0, **changes}
    return train_recipe(
        root / f"{name}.yaml",
        store=config["store"],
        output=root / name,
        student=config["student"],
        loss=config["loss"],
        **settings,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, topk_stores, stores, student_dir, same_tokenizer_student) -> Path:
    root = tmp_path_factory.mktemp("parallel_extras")
    configs = _configurations(topk_stores, stores, student_dir, same_tokenizer_student)
    two_process = []
    for name, config in configs.items():
        for lora, suffix in ((False, ""), (True, "-lora")):
            extra = {"lora": LORA} if lora else {}
            run_train(
                load_yaml_model(
                    TrainRecipe,
                    _recipe(
                        root, f"{name}{suffix}-one", config, optim__micro_batch_size=4, **extra
                    ),
                )
            )
            layout = "ddp" if lora else "fsdp2"
            two_process.append(
                _recipe(
                    root,
                    f"{name}{suffix}-{layout}",
                    config,
                    optim__micro_batch_size=2,
                    parallel=layout,
                    **extra,
                )
            )
    result = torchrun_train_all(two_process, port=29537, timeout=1500)
    assert result.returncode == 0, result.stderr[-6000:]
    return root


def _step_records(output: Path) -> list[dict]:
    return [r for r in read_metrics(output) if "loss" in r]


def _assert_same_steps_and_weights(one: Path, two: Path) -> None:
    records_one, records_two = _step_records(one), _step_records(two)
    assert len(records_one) == len(records_two) == 2
    for record_one, record_two in zip(records_one, records_two, strict=True):
        assert record_one.keys() == record_two.keys()
        for key in sorted(record_one.keys() - _NOT_COMPARED):
            assert_fp32_close(record_two[key], record_one[key], ulps=4096)
    weights_one = load_file(one / "student" / "model.safetensors")
    weights_two = load_file(two / "student" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for key, value in weights_one.items():
        assert_fp32_close(weights_two[key].numpy(), value.numpy(), ulps=4096, scale=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_on_two_processes_logs_the_same_steps_and_trains_the_same_weights_as_one(runs, name):
    _assert_same_steps_and_weights(runs / f"{name}-one", runs / f"{name}-fsdp2")
    if name in ("uld+sft", "mined+sft"):  # GradMag measured, never the fallback 1.0
        for record in _step_records(runs / f"{name}-fsdp2"):
            weight = record["gradmag_weight_sft"]
            assert math.isfinite(weight) and weight > 0 and weight != 1.0, record


@pytest.mark.parametrize("name", NAMES)
def test_lora_under_ddp_logs_the_same_steps_and_saves_the_same_merged_weights_as_one(runs, name):
    _assert_same_steps_and_weights(runs / f"{name}-lora-one", runs / f"{name}-lora-ddp")


@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_and_saves_a_merged_student_that_transformers_loads(runs, name):
    from transformers import AutoModelForCausalLM

    out = runs / f"{name}-lora-one"
    records = _step_records(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    saved = load_file(out / "student" / "model.safetensors")
    assert not any("lora" in key or "modules_to_save" in key for key in saved)
    full = load_file(runs / f"{name}-one" / "student" / "model.safetensors")
    assert saved.keys() == full.keys()  # the same plain model as full fine-tuning saves
    model = AutoModelForCausalLM.from_pretrained(out / "student", trust_remote_code=True)
    assert model is not None
