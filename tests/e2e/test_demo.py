"""The README demo end to end through the real `alm` entry point: the embedded SmolLM2 teacher precomputes a
store (and a held-out one) from the built-in corpus, then `alm train` moves it to bytes and trains it.

Slow tier: it converts the GGUF teacher once (~20 s) and runs a 135M model on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def alm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alm.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.slow
def test_demo_recipes_precompute_then_train_a_byte_student(tmp_path):
    train_store, heldout_store = tmp_path / "store", tmp_path / "heldout"
    done = alm(
        "precompute",
        "stages/demo_precompute.yaml",
        "--set",
        "data.limit=24",
        "--set",
        f"output={train_store}",
    )
    assert done.returncode == 0, done.stderr
    done = alm(
        "precompute",
        "stages/demo_precompute_heldout.yaml",
        "--set",
        "data.limit=4",
        "--set",
        f"output={heldout_store}",
    )
    assert done.returncode == 0, done.stderr
    assert "256 sequences" not in done.stdout  # the override took effect

    inspected = alm("inspect", str(train_store))
    assert inspected.returncode == 0, inspected.stderr
    assert "24" in inspected.stdout

    out = tmp_path / "student"
    done = alm(
        "train",
        "stages/demo_train.yaml",
        "--set",
        f"stores.0.path={train_store}",
        "--set",
        f"eval.store={heldout_store}",
        "--set",
        f"output_dir={out}",
        "--set",
        "optim.steps=3",
        "--set",
        "checkpoint_every=0",
    )
    assert done.returncode == 0, done.stderr
    assert "held-out bits per byte" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/student_bpb" in r for r in records)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert len(tokenizer) == student.get_input_embeddings().weight.shape[0]
    assert tokenizer("hé", add_special_tokens=False)["input_ids"] == list("hé".encode())
