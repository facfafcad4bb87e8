"""`alm train` runs that are safe by default (issue 10 items 1-4), each through the CLI in real processes.

Ctrl-C (SIGINT) and SIGTERM mid-run, then `--resume`, give the weights of an uninterrupted run with default
settings, bit for bit; `--resume` without a checkpoint exits 2; a finished run says so; a run that failed before
its first step can be rerun without `--overwrite`; `--resume` with a changed recipe applies and records what keeps
it exact (a longer run gets the new recipe's schedule, never a step at lr 0.0) and refuses the rest; `--dry-run`
exits 2 for each tokenizer problem; an empty loss region is refused before training.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_helpers import REPO, child_env, run_alm, train_recipe, write_yaml

from alm.train.log import read_metrics

CHAT_SPEC = REPO / "data_specs" / "example_chat_jsonl.yaml"


def weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run / "student" / "model.safetensors"))


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def step_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "loss" in r]


STEPS = 40


def default_recipe(tmp_path: Path, store: Path, student_dir: Path, name: str, **changes) -> Path:
    """Default checkpoint settings (no checkpoint_every), threads: 1, one loss."""
    return train_recipe(
        tmp_path / f"{name}.yaml",
        store=store,
        output=tmp_path / name,
        student={"model": str(student_dir)},
        optim__steps=STEPS,
        optim__micro_batch_size=2,
        threads=1,
        **changes,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, stores, student_dir) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = run_alm("train", str(default_recipe(root, stores["plain"], student_dir, "reference")))
    assert result.returncode == 0, result.stderr
    return root / "reference"


@pytest.mark.slow  # real processes, ~1 min on the 2-core machine
@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_mid_run_then_resume_gives_the_uninterrupted_weights_bitwise(
    tmp_path, stores, student_dir, reference_run, signum, exit_code
):
    recipe = default_recipe(tmp_path, stores["plain"], student_dir, "run")
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "alm.cli", "train", str(recipe)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(step_records(run)) >= 3:  # mid-run: a few steps done, most to come
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == exit_code, stderr
    assert "rerun with --resume" in stderr and "Traceback" not in stderr, stderr
    assert "checkpoint saved" in stderr
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    stopped_at = int(checkpoints[-1].removeprefix("step-"))
    assert 3 <= stopped_at < STEPS
    assert not (run / "student").exists()

    resumed = run_alm("train", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(run), weights(reference_run))
    want = [(r["step"], r["loss"], r["lr"]) for r in step_records(reference_run)]
    assert [(r["step"], r["loss"], r["lr"]) for r in step_records(run)] == want


@pytest.mark.slow  # real processes, ~1 min on the 2-core machine
def test_resume_without_a_checkpoint_exits_2_and_a_failed_first_run_reruns_without_overwrite(
    tmp_path, stores, student_dir
):
    broken = tmp_path / "student-without-weights"  # the tokenizer loads, the model does not
    shutil.copytree(student_dir, broken)
    weights_file = broken / "model.safetensors"
    kept = weights_file.read_bytes()
    weights_file.unlink()
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(broken)},
        optim__steps=2,
        threads=1,
    )
    first = run_alm("train", str(recipe))
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr
    resumed = run_alm("train", str(recipe), "--resume")
    assert resumed.returncode == 2, resumed.stderr
    assert "no checkpoint yet" in resumed.stderr and "without --resume" in resumed.stderr
    weights_file.write_bytes(kept)  # the user fixes the problem and runs the same command again
    again = run_alm("train", str(recipe))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
    assert not list(
        (tmp_path / "run").glob(".alm-replaced-*")
    )  # the failed attempt's files are gone
    empty = train_recipe(
        tmp_path / "e.yaml",
        store=stores["plain"],
        output=tmp_path / "never-run",
        student={"model": str(student_dir)},
        optim__steps=2,
    )
    nothing = run_alm("train", str(empty), "--resume")
    assert nothing.returncode == 2 and "holds no training run" in nothing.stderr


def expected_lr(peak: float, step: int, total: int) -> float:
    """Warmup 0 then linear decay to 0 at `total` (ALM_SPEC §8): the rate of optimizer step `step` (1-based)."""
    return peak * (total - (step - 1)) / total


def test_finished_run_says_so_and_extends_with_the_new_schedule_recorded(
    tmp_path, stores, student_dir
):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student_dir)},
        optim__steps=6,
        threads=1,
    )
    run = tmp_path / "run"
    assert run_alm("train", str(recipe)).returncode == 0
    finished = run_alm("train", str(recipe), "--resume")
    assert finished.returncode == 0, finished.stderr
    assert "is finished (step 6 of 6)" in finished.stdout
    assert [r["step"] for r in step_records(run)] == list(
        range(1, 7)
    )  # nothing retrained or duplicated

    refused = run_alm("train", str(recipe), "--resume", "--set", "optim.lr=1e-2", "--set", "seed=3")
    assert refused.returncode == 2, refused.stderr
    assert "optim.lr: 0.003 -> 0.01" in refused.stderr and "seed: 0 -> 3" in refused.stderr

    extended = run_alm("train", str(recipe), "--resume", "--set", "optim.steps=12")
    assert extended.returncode == 0, extended.stderr
    records = step_records(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    peak = 3e-3
    for record in records[6:]:  # the new recipe's schedule from step 7 on: no step at lr 0.0
        assert record["lr"] == pytest.approx(expected_lr(peak, record["step"], 12), rel=1e-6)
    assert records[6]["lr"] > 0.0
    assert "optim.steps: 6 -> 12" in (run / "train.log").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["steps"] == 12
    again = run_alm("train", str(recipe), "--resume", "--set", "optim.steps=12")
    assert again.returncode == 0 and "is finished (step 12 of 12)" in again.stdout


@pytest.fixture(scope="module")
def chat_store(teacher_dir, tmp_path_factory) -> Path:
    from alm.precompute import run_precompute

    root = tmp_path_factory.mktemp("chat")
    recipe = {
        "teacher": {
            "model": str(teacher_dir),
            "backend": "hf",
            "device": "cpu",
            "dtype": "float32",
        },
        "data": {"spec": str(CHAT_SPEC)},
        "output": str(root / "chat"),
        "max_length": 96,
        "token_budget": 512,
        "shard_size": 4,
    }
    run_precompute(write_yaml(root / "chat.yaml", recipe), shard="0/1")
    return root / "chat"


def _save(tokenizer, folder: Path) -> Path:
    tokenizer.save_pretrained(folder)
    return folder


def _refused_tokenizer(kind: str, folder: Path) -> Path:
    """A student tokenizer that cannot reproduce bytes, trained here on the stdlib text."""
    from factories import training_texts
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = training_texts(200)
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"])
    elif kind == "nfkc":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # a SentencePiece-style BPE without byte fallback: characters it never saw become <unk>
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], limit_alphabet=60)
    tok.train_from_iterator(texts, trainer=trainer)
    return _save(PreTrainedTokenizerFast(tokenizer_object=tok), folder)


@pytest.mark.slow  # real processes, ~1 min on the 2-core machine
@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "no such folder"),
        ("wordpiece", "WordPiece"),
        ("nfkc", "NFKC"),
        ("no_byte_fallback", "byte fallback"),
        ("chat_family", "template family 'plain' has no"),
    ],
)
def test_dry_run_exits_2_for_each_tokenizer_problem(
    tmp_path, stores, chat_store, student_dir, problem, message
):
    from factories import bpe_tokenizer

    store = stores["plain"]
    if problem == "missing":
        tokenizer = tmp_path / "no" / "such" / "tokenizer"
    elif (
        problem == "chat_family"
    ):  # a tokenizer without chat specials (family `plain`) on chat data
        store = chat_store
        tokenizer = _save(bpe_tokenizer(400, specials=("<|endoftext|>",)), tmp_path / "plain-tok")
    else:
        tokenizer = _refused_tokenizer(problem, tmp_path / problem)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=store,
        output=tmp_path / "run",
        student={"model": str(student_dir), "tokenizer": str(tokenizer)},
    )
    result = run_alm("train", str(recipe), "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # nothing written: the real run can follow
    if (
        problem != "missing"
    ):  # the run itself stops the same way, before any model loads, leaving nothing
        run = run_alm("train", str(recipe))
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert not (tmp_path / "run").exists()


def test_dry_run_renders_one_example_of_each_store(tmp_path, stores, student_dir):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student_dir)},
        eval={"store": str(stores["heldout"])},
    )
    result = run_alm("train", str(recipe), "--dry-run")
    assert result.returncode == 0, result.stderr
    rendered = [line for line in result.stdout.splitlines() if "student tokens:" in line]
    assert len(rendered) == 2
    assert str(stores["plain"]) in rendered[0] and str(stores["heldout"]) in rendered[1]
    assert "ALM group(s)" in rendered[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # real processes, ~1 min on the 2-core machine
def test_an_empty_loss_region_is_refused_before_training(tmp_path, chat_store, student_dir):
    # the chat store trains on assistant turns only; 16 student tokens end inside the first user turn
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=chat_store,
        output=tmp_path / "run",
        student={"model": str(student_dir), "max_length": 16},
    )
    for args in (("--dry-run",), ()):
        result = run_alm("train", str(recipe), *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "nothing to train on" in result.stderr and "student.max_length=16" in result.stderr
    assert not (tmp_path / "run").exists()
    ok = train_recipe(
        tmp_path / "ok.yaml",
        store=chat_store,
        output=tmp_path / "ok",
        student={"model": str(student_dir), "max_length": 96},
        optim__steps=1,
    )
    result = run_alm("train", str(ok), "--dry-run")
    assert result.returncode == 0, result.stderr


def test_version_and_short_help():
    version = run_alm("--version")
    assert version.returncode == 0 and version.stdout.startswith("alm 0.")
    short = run_alm("train", "-h")
    assert short.returncode == 0 and "--resume" in short.stdout and "--dry-run" in short.stdout


def test_resume_changes_follow_the_exactness_rule():
    from alm.train.run_dir import RESUMABLE_CHANGES, recipe_changes

    old = {"optim": {"steps": 6, "lr": 1e-3}, "eval": None, "seed": 0, "log_every": 1}
    new = {
        "optim": {"steps": 12, "lr": 1e-3},
        "eval": {"store": "s", "every": 2},
        "seed": 0,
        "log_every": 2,
        "threads": 1,  # a key an older recipe did not have: not a change
    }
    assert recipe_changes(old, new) == [
        ("optim.steps", 6, 12),
        ("eval", None, {"store": "s", "every": 2}),
        ("log_every", 1, 2),
    ]
    assert "optim.lr" not in RESUMABLE_CHANGES and "seed" not in RESUMABLE_CHANGES
