"""`alm train` end to end on CPU: each loss trains, resume is exact, bad input is one clear message (exit 2).

Stores come from `run_precompute` with a tiny random teacher (see `conftest.py`); students are a tiny random
Llama with its own BPE tokenizer, or the teacher moved to bytes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import REPO, train_recipe

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.errors import ConfigError, StoreError, StoreMismatchError
from alm.train.command import run_train_cli
from alm.train.log import read_metrics
from alm.train.loop import run_train


def losses(output: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(output) if "loss" in r]


def train(tmp_path: Path, name: str, **kwargs) -> Path:
    recipe = train_recipe(tmp_path / f"{name}.yaml", output=tmp_path / name, **kwargs)
    run_train(load_yaml_model(TrainRecipe, recipe))
    return tmp_path / name


@pytest.mark.parametrize(
    ("kind", "hidden"),
    [("alm", 0.0), ("sft", 0.0), ("alm+sft", 0.0), ("alm", 1.0)],
    ids=["alm", "sft", "alm+sft", "alm+hidden"],
)
def test_each_loss_is_finite_and_falls_on_a_fixed_batch(
    tmp_path, stores, student_dir, kind, hidden
):
    # The held-out store has 4 sequences = one micro-batch, so every step sees the same batch.
    store = stores["train"] if hidden else stores["heldout"]
    out = train(
        tmp_path,
        "run",
        store=store,
        student={"model": str(student_dir)},
        loss={"kind": kind, "hidden": hidden},
        optim__steps=4,
        optim__micro_batch_size=4 if not hidden else 12,
    )
    values = losses(out)
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]
    assert (out / "student" / "config.json").is_file()
    if "alm" in kind:
        # the headline `alm` is the binary KL: the optimised binary CE (`alm_raw`) above the teacher's floor
        records = [r for r in read_metrics(out) if "loss" in r]
        assert all(0 <= r["alm"] < 0.5 * r["alm_raw"] for r in records), records
        assert records[-1]["alm"] < records[0]["alm"]


def test_a_run_without_debiasing_trains_another_objective(tmp_path, stores, student_dir):
    common = {
        "store": stores["heldout"],
        "student": {"model": str(student_dir)},
        "optim__steps": 1,
    }
    on = train(tmp_path, "on", **common)
    off = train(tmp_path, "off", loss={"kind": "alm", "debias": False}, **common)
    record_on, record_off = read_metrics(on)[0], read_metrics(off)[0]
    assert math.isfinite(record_off["alm_raw"]) and record_off["alm"] >= 0
    assert record_on["num_groups"] == record_off["num_groups"]  # same groups, no boundary terms
    assert abs(record_on["alm_raw"] - record_off["alm_raw"]) > 1e-6


def test_resume_after_interruption_matches_an_uninterrupted_run_bitwise(
    tmp_path, stores, student_dir
):
    common = {
        "store": stores["train"],
        "student": {"model": str(student_dir)},
        "loss": {"kind": "alm+sft"},
        "optim__steps": 4,
        "optim__micro_batch_size": 2,
        "optim__grad_accum": 2,
        "optim__warmup_steps": 1,
        "checkpoint_every": 2,
        "num_workers": 1,
    }
    full = train(tmp_path, "full", **common)
    recipe = train_recipe(tmp_path / "part.yaml", output=tmp_path / "part", **common)
    # stopped after step 3 as a time-limited job would be: its checkpoint is the newest
    run_train(load_yaml_model(TrainRecipe, recipe, ["stop_after_steps=3"]))
    assert not (tmp_path / "part" / "student").exists()
    # a record written after the last checkpoint (the run died before its next one) is dropped on resume
    with (tmp_path / "part" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 123.0}\n')
    run_train(load_yaml_model(TrainRecipe, recipe), resume=True)
    assert losses(tmp_path / "part") == losses(full)
    weights_full = load_file(full / "student" / "model.safetensors")
    weights_part = load_file(tmp_path / "part" / "student" / "model.safetensors")
    assert weights_full.keys() == weights_part.keys()
    for key, value in weights_full.items():
        assert torch.equal(value, weights_part[key]), key


def test_byte_level_student_by_transfer_trains_and_saves_a_loadable_model(tmp_path, stores):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(
        tmp_path,
        "bytes",
        store=stores["plain"],
        student={
            "transfer": {"from": "teacher", "tokenizer": "bytes", "untie_embeddings": True},
            "max_length": 256,
        },
        loss={"kind": "alm+sft"},
        optim__steps=3,
        eval={"store": str(stores["heldout"])},
    )
    values = losses(out)
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    evals = [r for r in read_metrics(out) if "eval/student_bpb" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert all(math.isfinite(r["eval/student_bpb"]) and r["eval/teacher_bpb"] > 0 for r in evals)
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert len(tokenizer) == model.config.vocab_size == 256 + 3
    assert tokenizer("hi", add_special_tokens=False)["input_ids"] == [ord("h"), ord("i")]
    assert model.config.tie_word_embeddings is False


def test_lora_student_trains_and_saves_merged_weights(tmp_path, stores, student_dir):
    out = train(
        tmp_path,
        "lora",
        store=stores["heldout"],
        student={"model": str(student_dir)},
        lora={"r": 4, "alpha": 8},
        optim__steps=3,
    )
    values = losses(out)
    assert values[-1] < values[0]
    saved = load_file(out / "student" / "model.safetensors")
    assert not any("lora" in key for key in saved)


def test_dry_run_prints_the_resolved_config_and_checks_the_store(tmp_path, stores, student_dir):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": str(student_dir)},
    )
    text = run_train_cli(recipe, ["optim.lr=5e-4"], dry_run=True, resume=False, overwrite=False)
    assert "lr: 0.0005" in text and "stores OK: 8 sequences" in text
    assert not (tmp_path / "out").exists()


def test_store_with_other_fingerprints_is_refused_naming_both_before_any_model_loads(
    tmp_path, stores
):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": "/no/such/model"},
        stores=[{"path": str(stores["plain"]), "teacher_tokenizer_fingerprint": "abc123"}],
    )
    with pytest.raises(StoreMismatchError) as err:
        run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)
    assert "abc123" in str(err.value) and "teacher tokenizer fingerprint is" in str(err.value)
    recipe = train_recipe(
        tmp_path / "r2.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": "/no/such/model"},
        stores=[{"path": str(stores["plain"]), "data_fingerprint": "feedbeef"}],
    )
    with pytest.raises(StoreMismatchError, match="feedbeef"):
        run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)


def test_hidden_loss_without_stored_hidden_states_is_refused_before_any_model_loads(
    tmp_path, stores
):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": "/no/such/model"},
        loss={"kind": "alm", "hidden": 1.0},
    )
    with pytest.raises(StoreError, match="no `hidden` field"):
        run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)


def test_output_folder_rules(tmp_path, stores, student_dir):
    common = {"store": stores["heldout"], "student": {"model": str(student_dir)}, "optim__steps": 1}
    out = train(tmp_path, "run", **common)
    recipe = tmp_path / "run.yaml"
    with pytest.raises(ConfigError, match="already holds a training run"):
        run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)
    # --overwrite replaces a run of ours
    run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=True)
    assert len(losses(out)) == 1
    # a foreign folder is never touched, even with --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    recipe = train_recipe(tmp_path / "f.yaml", output=foreign, **common)
    with pytest.raises(ConfigError, match="not an alm training run"):
        run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=True)
    assert (foreign / "precious.txt").read_text() == "keep me"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "ALM_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "alm.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_user_errors_exit_2_with_one_message(tmp_path, stores, student_dir):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": str(student_dir)},
        optim={"steps": 2, "lr": -1, "micro_batch_sise": 2},
        loss={"kind": "almm"},
    )
    result = run_cli("train", str(recipe))
    assert result.returncode == 2
    assert (
        "optim.lr" in result.stderr
        and "micro_batch_sise" in result.stderr
        and "loss.kind" in result.stderr
    )
    assert "Traceback" not in result.stderr
    bad_store = train_recipe(
        tmp_path / "s.yaml",
        store=tmp_path / "missing-store",
        output=tmp_path / "out",
        student={"model": str(student_dir)},
    )
    result = run_cli("train", str(bad_store))
    assert (
        result.returncode == 2
        and "missing-store" in result.stderr
        and "Traceback" not in result.stderr
    )
    # an output folder that already holds a run: refused before any model loads
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "alm-run.json").write_text('{"kind": "alm-train-run", "config_hash": "0123"}')
    (taken / "checkpoints" / "step-00000001").mkdir(parents=True)  # a run with something to keep
    (taken / "checkpoints" / "step-00000001" / "state.pt").write_bytes(b"")
    busy = train_recipe(
        tmp_path / "b.yaml",
        store=stores["plain"],
        output=taken,
        student={"model": "/no/such/model"},
    )
    result = run_cli("train", str(busy))
    assert result.returncode == 2 and "already holds a training run" in result.stderr
    assert "--resume" in result.stderr and "Traceback" not in result.stderr


def torchrun_two(port: int, *command: str) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "ALM_LOG_LEVEL": "WARNING",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*launcher, "--master-port", str(port), *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_torchrun_fsdp2_resume_after_interruption_matches_an_uninterrupted_run_bitwise(
    tmp_path, stores, student_dir
):
    common = {
        "store": stores["train"],
        "student": {"model": str(student_dir)},
        "loss": {"kind": "alm+sft"},
        "parallel": "fsdp2",
        "optim__steps": 4,
        "optim__micro_batch_size": 2,
        "optim__warmup_steps": 1,
    }
    full = train_recipe(tmp_path / "full.yaml", output=tmp_path / "full", **common)
    torchrun_two(29519, "-m", "alm.cli", "train", str(full))
    part = train_recipe(tmp_path / "part.yaml", output=tmp_path / "part", **common)
    # killed after step 2, with a checkpoint that gathers both ranks' optimizer shards; steps 3 and 4 then
    # depend on the restored Adam moments (the loss of step 4 and the final weights)
    torchrun_two(29520, "-m", "alm.cli", "train", str(part), "--set", "stop_after_steps=2")
    assert not (tmp_path / "part" / "student").exists()
    torchrun_two(29521, "-m", "alm.cli", "train", str(part), "--resume")
    # Exact, not close: FSDP2 on CPU reduces the same shards in the same order in both runs, and the
    # checkpoint round trip (gather on rank 0, each rank slicing its shard back out) only copies values.
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    weights_full = load_file(tmp_path / "full" / "student" / "model.safetensors")
    weights_part = load_file(tmp_path / "part" / "student" / "model.safetensors")
    assert weights_full.keys() == weights_part.keys()
    for key, value in weights_full.items():
        assert torch.equal(value, weights_part[key]), key
