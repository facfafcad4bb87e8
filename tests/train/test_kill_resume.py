"""kill -9 at random points of real `alm precompute`, `alm store finalize` and `alm train` processes (default
checkpoint settings): each resumes to a result identical to an uninterrupted run; two workers given the same shard
never interleave (issue 9). `slow`: many trials of real processes. Each test prints its trial counts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DATA_SPEC, REPO, train_recipe, write_yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

NUM_TRIALS = 4


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ALM_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }


def _alm(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alm.cli", *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """kill -9 after `seconds` unless it ended before; True when it was killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _precompute_recipe(root: Path, teacher: Path, output: Path) -> Path:
    return write_yaml(
        root / f"{output.name}.yaml",
        {
            "teacher": {
                "model": str(teacher),
                "backend": "hf",
                "device": "cpu",
                "dtype": "float32",
            },
            "data": {"spec": str(DATA_SPEC), "split": "train", "limit": 24},
            "output": str(output),
            "max_length": 48,
            "token_budget": 256,
            "row_chunk": 64,
            "shard_size": 4,
        },
    )


def _store_identity(store: Path) -> list:
    manifest = json.loads((store / "alm-store.json").read_text())
    return [(s["index"], s["arrays"], s["index_sha256"]) for s in manifest["shards"]]


def test_precompute_killed_at_random_points_resumes_to_an_identical_store(teacher_dir, tmp_path):
    from alm.store.verify import verify_store

    reference = tmp_path / "reference"
    started = time.perf_counter()
    code, out = _finish(
        _alm("precompute", str(_precompute_recipe(tmp_path, teacher_dir, reference)))
    )
    assert code == 0, out
    duration = time.perf_counter() - started
    rng = np.random.default_rng(0)
    survived = killed = 0
    for trial in range(NUM_TRIALS):
        store = tmp_path / f"trial-{trial}"
        recipe = _precompute_recipe(tmp_path, teacher_dir, store)
        was_killed = _kill_after(
            _alm("precompute", str(recipe)), float(rng.uniform(0.2, 1.0)) * duration
        )
        killed += was_killed
        code, out = _finish(_alm("precompute", str(recipe)))  # the same command again resumes
        assert code == 0, out
        assert _store_identity(store) == _store_identity(reference)
        assert verify_store(store).ok
        survived += 1
        shutil.rmtree(store)
    print(
        f"\nprecompute kill -9 trials: {killed} killed of {NUM_TRIALS}, {survived} resumed identical"
    )


def test_finalize_killed_never_leaves_a_partial_manifest(teacher_dir, tmp_path):
    from alm.store.reader import open_store

    store = tmp_path / "store"
    code, out = _finish(_alm("precompute", str(_precompute_recipe(tmp_path, teacher_dir, store))))
    assert code == 0, out
    reference = _store_identity(store)
    rng = np.random.default_rng(1)
    killed = 0
    for _ in range(NUM_TRIALS):
        (store / "alm-store.json").unlink()
        was_killed = _kill_after(
            _alm("store", "finalize", str(store)), float(rng.uniform(0.5, 4.0))
        )
        killed += was_killed
        if (store / "alm-store.json").exists():  # finished before the kill: complete and valid
            assert _store_identity(store) == reference
            open_store(store)
        code, out = _finish(_alm("store", "finalize", str(store)))
        assert code == 0, out
        assert _store_identity(store) == reference
        assert not [p for p in store.iterdir() if ".tmp-" in p.name]
    print(
        f"\nfinalize kill -9 trials: {killed} killed of {NUM_TRIALS}, all left no or a complete manifest"
    )


def test_two_workers_on_the_same_shard_never_interleave(teacher_dir, tmp_path):
    from alm.store.verify import verify_store

    reference = tmp_path / "reference"
    assert (
        _finish(_alm("precompute", str(_precompute_recipe(tmp_path, teacher_dir, reference))))[0]
        == 0
    )
    store = tmp_path / "store"
    recipe = _precompute_recipe(tmp_path, teacher_dir, store)
    first, second = _alm("precompute", str(recipe)), _alm("precompute", str(recipe))
    results = [_finish(first), _finish(second)]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, out in results:
        if code == 2:
            assert "is being written by host" in out and "Traceback" not in out, out
    if codes == [0, 2]:  # the refused worker's shards: the same command again finishes them
        assert _finish(_alm("precompute", str(recipe)))[0] == 0
    assert _store_identity(store) == _store_identity(reference)
    assert verify_store(store).ok
    print(f"\ntwo workers on the same shards: exit codes {codes}")


def test_training_killed_at_random_points_resumes_to_identical_weights(
    stores, student_dir, tmp_path
):
    from safetensors.numpy import load_file

    def recipe(out: Path) -> Path:  # default checkpoint settings
        return train_recipe(
            tmp_path / f"{out.name}.yaml",
            store=stores["plain"],
            output=out,
            student={"model": str(student_dir)},
            optim__steps=6,
        )

    reference = tmp_path / "reference"
    started = time.perf_counter()
    code, out = _finish(_alm("train", str(recipe(reference))))
    assert code == 0, out
    duration = time.perf_counter() - started
    want = load_file(str(reference / "student" / "model.safetensors"))
    rng = np.random.default_rng(2)
    killed = identical = 0
    for trial in range(NUM_TRIALS):
        run = tmp_path / f"run-{trial}"
        was_killed = _kill_after(
            _alm("train", str(recipe(run))), float(rng.uniform(0.3, 1.0)) * duration
        )
        killed += was_killed
        code, out = _finish(_alm("train", str(recipe(run)), "--resume"))
        if (
            code == 2
        ):  # killed before its first checkpoint (or before the run folder was prepared, on a
            # loaded machine): the same command starts it again
            assert "no checkpoint yet" in out or "holds no training run" in out, out
            code, out = _finish(_alm("train", str(recipe(run))))
        assert code == 0, out
        got = load_file(str(run / "student" / "model.safetensors"))
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        identical += 1
        shutil.rmtree(run)
    print(
        f"\ntraining kill -9 trials: {killed} killed of {NUM_TRIALS}, {identical} resumed to identical "
        f"weights in all {len(want)} tensors"
    )
