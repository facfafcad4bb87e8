"""A full disk under a real `alm precompute` process (issue 9): a small tmpfs fills up mid-store; the process ends
with one message naming what ran out (exit 2, no traceback), leaves no temp file (which would keep the disk full),
keeps the shards it finished, and the same command on a grown disk finishes the identical store.

`slow`: three real precompute processes. Needs `mount -t tmpfs` (root, or CAP_SYS_ADMIN): skipped cleanly where
mounting is not allowed. `tests/store/test_store_writers.py` and `tests/train/test_run_outputs.py` do the same for
the shard writer and for training's checkpoints and student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from train_helpers import DATA_SPEC, REPO, write_yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _alm(*argv: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ALM_LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "alm.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _recipe(root: Path, teacher: Path, output: Path) -> Path:
    return write_yaml(
        root / f"{uuid.uuid4().hex[:6]}.yaml",
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


def _identity(store: Path) -> list:
    manifest = json.loads((store / "alm-store.json").read_text())
    return [(s["index"], s["arrays"], s["index_sha256"]) for s in manifest["shards"]]


def test_a_full_disk_in_a_real_precompute_is_one_message_and_the_rerun_finishes_it(
    teacher_dir, tmp_path
):
    from alm.store.verify import verify_store

    reference = tmp_path / "reference"
    code, out = _alm("precompute", str(_recipe(tmp_path, teacher_dir, reference)))
    assert code == 0, out
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        store = disk / "store"
        recipe = _recipe(tmp_path, teacher_dir, store)
        code, out = _alm("precompute", str(recipe))
        assert code == 2, out
        assert "no space left on the device" in out and "Traceback" not in out, out
        assert out.count("error: ") == 1, out
        leftovers = [str(p) for p in disk.rglob("*") if ".tmp" in p.name or ".claim" in p.name]
        assert leftovers == []
        finished = sorted(p.parent.name for p in (store / "shards").glob("shard-*/shard.json"))
        assert not (store / "alm-store.json").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        code, out = _alm("precompute", str(recipe))  # the same command again
        assert code == 0, out
        assert _identity(store) == _identity(reference)
        assert verify_store(store).ok
        print(
            f"\nfull disk (96 KiB tmpfs) in a real precompute: exit 2 with one message, no temp file left, "
            f"{len(finished)} finished shard(s) kept; the rerun on the grown disk finished the identical store"
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
