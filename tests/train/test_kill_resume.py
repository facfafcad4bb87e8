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
from train_helpers import DATA_SPEC, child_env, train_recipe, write_yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

NUM_TRIALS = 8  # per kind of process


def _alm(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alm.cli", *argv],
        env=child_env("WARNING"),
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
            "data": {"spec": str(DATA_SPEC), "split": "train", "limit": 48},
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


def _precompute_phase(store: Path, num_shards: int) -> str:
    """Where a killed precompute stopped, from what it left."""
    if (store / "alm-store.json").exists():
        return "after the manifest"
    shards = store / "shards"
    done = len(list(shards.glob("shard-*/shard.json"))) if shards.is_dir() else 0
    if done == num_shards:
        return "during finalize"
    writing = shards.is_dir() and any(shards.glob(".tmp-shard-*"))
    if done == 0 and not writing:
        return "before the first shard (start-up, model load)"
    return "mid-shard" if writing else "between shards"


def test_precompute_killed_at_random_points_resumes_to_an_identical_store(teacher_dir, tmp_path):
    """Half the kills at a uniform random point of the whole run, half at one of the scoring and writing (after
    the first shard folder appears, within the reference run's time from there to its end)."""
    from alm.store.verify import verify_store

    reference = tmp_path / "reference"
    started = time.perf_counter()
    proc = _alm("precompute", str(_precompute_recipe(tmp_path, teacher_dir, reference)))
    to_scoring = _wait_for(proc, reference / "shards")  # the first shard writer opened
    code, out = _finish(proc)
    assert code == 0, out
    duration = time.perf_counter() - started
    scoring = duration - to_scoring  # scoring, writing shards, finalize
    num_shards = len(_store_identity(reference))
    rng = np.random.default_rng(0)
    survived = killed = 0
    phases: dict[str, int] = {}
    for trial in range(NUM_TRIALS):
        store = tmp_path / f"trial-{trial}"
        recipe = _precompute_recipe(tmp_path, teacher_dir, store)
        proc = _alm("precompute", str(recipe))
        if (
            trial % 2 == 0
        ):  # start-up dominates a tiny run: half the kills land in the scoring itself
            _wait_for(proc, store / "shards")
            was_killed = _kill_after(proc, float(rng.uniform(0.0, 1.0)) * scoring)
        else:
            was_killed = _kill_after(proc, float(rng.uniform(0.0, 1.0)) * duration)
        killed += was_killed
        if was_killed:
            phase = _precompute_phase(store, num_shards)
            phases[phase] = phases.get(phase, 0) + 1
        code, out = _finish(_alm("precompute", str(recipe)))  # the same command again resumes
        assert code == 0, out
        assert _store_identity(store) == _store_identity(reference)
        assert verify_store(store).ok
        survived += 1
        shutil.rmtree(store)
    where = ", ".join(f"{n} {phase}" for phase, n in sorted(phases.items()))
    print(
        f"\nprecompute kill -9 trials: {NUM_TRIALS} run, {killed} killed ({where}), {survived} resumed to an "
        "identical, verified store"
    )


def test_finalize_killed_never_leaves_a_partial_manifest(teacher_dir, tmp_path):
    from alm.store.reader import open_store

    store = tmp_path / "store"
    code, out = _finish(_alm("precompute", str(_precompute_recipe(tmp_path, teacher_dir, store))))
    assert code == 0, out
    reference = _store_identity(store)
    (store / "alm-store.json").unlink()
    started = time.perf_counter()
    assert _finish(_alm("store", "finalize", str(store)))[0] == 0
    duration = time.perf_counter() - started  # most of it is start-up; the writes come at the end
    rng = np.random.default_rng(1)
    killed = complete = 0
    for _ in range(NUM_TRIALS):
        (store / "alm-store.json").unlink()
        was_killed = _kill_after(
            _alm("store", "finalize", str(store)), float(rng.uniform(0.3, 1.0)) * duration
        )
        killed += was_killed
        if (store / "alm-store.json").exists():  # finished before the kill: complete and valid
            assert _store_identity(store) == reference
            open_store(store)
            complete += was_killed
        code, out = _finish(_alm("store", "finalize", str(store)))
        assert code == 0, out
        assert _store_identity(store) == reference
        assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
        open_store(store)
    print(
        f"\nfinalize kill -9 trials: {NUM_TRIALS} run, {killed} killed ({killed - complete} before the manifest "
        f"was written, {complete} after); every kill left no manifest or a complete one, and every rerun "
        "finalized the identical store"
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


def _wait_for(proc: subprocess.Popen, path: Path) -> float:
    """Poll until `path` exists or the process ends; the time it took."""
    started = time.perf_counter()
    while not path.exists() and proc.poll() is None:
        time.sleep(0.02)
    return time.perf_counter() - started


def _training_phase(run: Path) -> str:
    """Where a killed training run stopped, from what it left."""
    if (run / "student" / "model.safetensors").exists():
        return "after the student was saved"
    checkpoints = list((run / "checkpoints").glob("step-*")) if run.is_dir() else []
    if checkpoints:
        return "after a checkpoint"
    if (run / "metrics.jsonl").exists():
        return "training, before the first checkpoint"
    return "start-up (imports, store checks, model load)"


@pytest.mark.parametrize(
    ("checkpoint_every", "num_trials"),
    [(None, NUM_TRIALS), (3, NUM_TRIALS // 2)],
    ids=["default-checkpoints", "checkpoint-every-3"],
)
def test_training_killed_at_random_points_resumes_to_identical_weights(
    stores, student_dir, tmp_path, checkpoint_every, num_trials
):
    """Default checkpoint settings (here a checkpoint at the end only): a kill before it leaves nothing to resume
    and the same command starts again; a kill after it resumes from it. With `checkpoint_every: 3`, kills mid-run
    resume from the last checkpoint. Either way the student is identical to one trained in one go.

    Kill points: start-up dominates a tiny run's wall time, so half the trials (all with `checkpoint_every`) are
    killed at a uniform random point of the training itself (after the first metrics line, within the reference
    run's time from there to its end), the others at a uniform random point of the whole run."""
    from safetensors.numpy import load_file

    extra = {} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}

    def recipe(out: Path) -> Path:
        return train_recipe(
            tmp_path / f"{out.name}.yaml",
            store=stores["plain"],
            output=out,
            student={"model": str(student_dir)},
            optim__steps=12,
            **extra,
        )

    reference = tmp_path / "reference"
    started = time.perf_counter()
    proc = _alm("train", str(recipe(reference)))
    to_training = _wait_for(proc, reference / "metrics.jsonl")
    code, out = _finish(proc)
    assert code == 0, out
    duration = time.perf_counter() - started
    training = duration - to_training  # first metrics line to the end of the run
    want = load_file(str(reference / "student" / "model.safetensors"))
    rng = np.random.default_rng(2)
    killed = identical = resumed = restarted = 0
    phases: dict[str, int] = {}
    for trial in range(num_trials):
        run = tmp_path / f"run-{trial}"
        proc = _alm("train", str(recipe(run)))
        if checkpoint_every is not None or trial % 2 == 0:
            _wait_for(proc, run / "metrics.jsonl")
            was_killed = _kill_after(proc, float(rng.uniform(0.0, 1.0)) * training)
        else:
            was_killed = _kill_after(proc, float(rng.uniform(0.0, 1.0)) * duration)
        killed += was_killed
        if was_killed:
            phase = _training_phase(run)
            phases[phase] = phases.get(phase, 0) + 1
        code, out = _finish(_alm("train", str(recipe(run)), "--resume"))
        if (
            code == 2
        ):  # killed before its first checkpoint: the same command without --resume starts again
            assert "no checkpoint yet" in out or "holds no training run" in out, out
            assert "Traceback" not in out, out
            code, out = _finish(_alm("train", str(recipe(run))))
            restarted += 1
        else:
            resumed += 1
        assert code == 0, out
        got = load_file(str(run / "student" / "model.safetensors"))
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        identical += 1
        shutil.rmtree(run)
    settings = (
        "default checkpoint settings"
        if checkpoint_every is None
        else f"checkpoint_every: {checkpoint_every}"
    )
    where = ", ".join(f"{n} {phase}" for phase, n in sorted(phases.items()))
    print(
        f"\ntraining kill -9 trials ({settings}): {num_trials} run, {killed} killed ({where}); "
        f"{resumed} resumed from a checkpoint, {restarted} started again (no checkpoint yet); {identical} "
        f"ended with identical weights in all {len(want)} tensors"
    )
