"""One live `alm train` per run folder, and failures that every process learns of (issue 10, leftovers).

- The run lock (`alm.train.run_lock`): a second invocation on a folder whose run is live (even before its first
  checkpoint) exits 2 naming the holder's host and pid, with or without `--overwrite`; a lock left by a killed
  run (its pid is dead on this host) is taken over. Real processes hold the locks.
- Under torchrun, rank 0 failing while it sets up the run folder (here: the lock is held) stops every rank
  promptly with that message, instead of leaving the others at a barrier.
- Bad `optim.lr_scheduler_kwargs` are refused by `--dry-run` and by `alm train` before any model loads (exit 2,
  nothing written).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, child_env, run_alm, train_recipe

from alm.config.train import OptimConfig
from alm.errors import ConfigError
from alm.train.log import read_metrics
from alm.train.run_lock import LOCK_FILE, RunLock, check_run_lock, read_lock
from alm.train.step import check_lr_schedule

# A real process that takes the run lock of the folder argv[1], says so, and holds it until killed.
_HOLDER = (
    "import sys, time; from alm.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(600)"
)


def _hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_live_lock_is_refused_naming_its_holder_and_a_dead_one_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    try:
        recorded = read_lock(folder)
        assert recorded is not None
        assert (recorded["host"], recorded["pid"]) == (socket.gethostname(), holder.pid)
        with pytest.raises(ConfigError, match=f"pid {holder.pid}") as refused:
            RunLock(folder).acquire()
        assert "in use by another alm train" in str(refused.value)
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            check_run_lock(folder)  # what --dry-run checks, writing nothing
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its pid dead
        holder.wait()
    assert (folder / LOCK_FILE).is_file()
    check_run_lock(folder)  # stale: not refused
    with RunLock(folder) as lock:
        assert lock.held
        taken = read_lock(folder)
        assert taken is not None and taken["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing else left behind


def test_a_lock_from_another_host_is_refused_with_the_file_to_delete(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(
        '{"host": "some-other-node", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00"}\n'
    )
    with pytest.raises(ConfigError, match="some-other-node") as refused:
        RunLock(folder).acquire()
    assert str(folder / LOCK_FILE) in str(refused.value)


@pytest.mark.slow  # real `alm train` processes, ~40 s on the 2-core machine
def test_a_rerun_while_the_first_run_is_live_exits_2_and_after_kill_9_it_runs(
    tmp_path, stores, student_dir
):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student_dir)},
        optim__steps=2000,  # default checkpointing: no checkpoint for the first 30 minutes
        optim__micro_batch_size=2,
        threads=1,
    )
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "alm.cli", "train", str(recipe)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if (run / "metrics.jsonl").is_file() and any("loss" in r for r in read_metrics(run)):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
        for extra in ([], ["--overwrite"]):
            second = run_alm("train", str(recipe), *extra)
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid}" in second.stderr, second.stderr
            assert "in use by another alm train" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None  # untouched: still training, its files in place
        assert (run / "alm-run.json").is_file() and not list(run.glob(".alm-replaced-*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    again = run_alm("train", str(recipe), "--set", "optim.steps=2")
    assert again.returncode == 0, again.stderr
    assert "taking over the stale run lock" in again.stderr
    assert (run / "student" / "model.safetensors").is_file()
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow  # a 2-process torchrun launch, ~25 s on the 2-core machine
def test_rank_0_failing_to_set_up_the_run_stops_every_rank(tmp_path, stores, student_dir):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student_dir)},
        optim__steps=2,
        optim__micro_batch_size=2,
        threads=1,
    )
    holder = _hold_lock(tmp_path / "run")  # rank 0 cannot take the run lock; the other ranks could
    started = time.monotonic()
    try:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        result = subprocess.run(
            [*launcher, "--master-port", "29537", "-m", "alm.cli", "train", str(recipe)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"pid {holder.pid}" in output, output[-3000:]
    assert "rank 0 failed to check the run lock, so this rank stops too" in output, output[-3000:]
    assert elapsed < 240  # not the process group's 30-minute timeout
    assert not (tmp_path / "run" / "alm-run.json").exists()


def test_schedule_arguments_are_checked_at_every_step():
    check_lr_schedule(OptimConfig(steps=50, warmup_steps=5, lr_scheduler_type="cosine"))
    long = OptimConfig(
        steps=200_000,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
    )
    check_lr_schedule(long)
    for kind, kwargs, message in [
        ("cosine_with_min_lr", {"min_lr_rate": 2}, "between 0 and optim.lr"),
        ("polynomial", {"power": -1}, "between 0 and optim.lr"),
        ("inverse_sqrt", {"timescale": 0}, "division by zero"),
        ("warmup_stable_decay", {}, "num_decay_steps"),
        ("linear", {"bogus": 1}, "bogus"),
    ]:
        optim = OptimConfig(steps=10, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs)
        with pytest.raises(ConfigError, match=message):
            check_lr_schedule(optim)


def _bad_schedule_recipe(tmp_path: Path, stores, student_dir) -> Path:
    return train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student_dir)},
        optim__lr_scheduler_type="cosine_with_min_lr",
        optim__lr_scheduler_kwargs={"min_lr_rate": 2},
    )


def test_bad_schedule_arguments_are_refused_before_any_model_loads(tmp_path, stores, student_dir):
    from alm.config import load_yaml_model
    from alm.config.train import TrainRecipe
    from alm.train.command import dry_run_report
    from alm.train.loop import run_train

    cfg = load_yaml_model(TrainRecipe, _bad_schedule_recipe(tmp_path, stores, student_dir))
    for check in (dry_run_report, run_train):
        with pytest.raises(ConfigError, match=r"min_lr_rate.*between 0 and optim\.lr"):
            check(cfg)
        assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow  # two CLI processes, ~40 s on the loaded 2-core machine
def test_bad_schedule_arguments_exit_2_through_the_cli(tmp_path, stores, student_dir):
    recipe = _bad_schedule_recipe(tmp_path, stores, student_dir)
    for extra in (["--dry-run"], []):
        result = run_alm("train", str(recipe), *extra)
        assert result.returncode == 2, result.stderr
        assert "min_lr_rate" in result.stderr and "between 0 and optim.lr" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists()  # nothing written
