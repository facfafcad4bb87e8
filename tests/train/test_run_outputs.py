"""`alm train --overwrite` replaces a finished run but deletes only the files alm wrote, after the new student is
saved (issue 9 item 4): a user's model card in `student/` and notes in `checkpoints/` survive."""

from __future__ import annotations

from train_helpers import train_recipe

from alm.train.command import run_train_cli


def test_overwrite_keeps_the_users_files_and_replaces_alms(stores, student_dir, tmp_path):
    out = tmp_path / "run"
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=out,
        student={"model": str(student_dir)},
        optim__steps=2,
        checkpoint_every=1,
    )
    run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)
    old_weights = (out / "student" / "model.safetensors").read_bytes()
    user_files = {
        "student/MY_MODEL_CARD.md": b"# my card",
        "checkpoints/keep_me.txt": b"notes",
        "notes.txt": b"top-level notes",
    }
    for rel, data in user_files.items():
        (out / rel).write_bytes(data)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=out,
        student={"model": str(student_dir)},
        optim__steps=1,
        checkpoint_every=1,
        seed=3,
    )
    run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=True)
    for rel, data in user_files.items():
        assert (out / rel).read_bytes() == data, rel
    assert not list(out.glob(".alm-replaced-*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "keep_me.txt",
        "step-00000001",
    ]
    assert (out / "student" / "model.safetensors").read_bytes() != old_weights


def test_a_full_disk_while_training_ends_in_a_message(stores, student_dir, tmp_path):
    import subprocess
    import uuid

    import pytest

    from alm.errors import StoreError

    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        recipe = train_recipe(
            tmp_path / "full.yaml",
            store=stores["plain"],
            output=disk / "run",
            student={"model": str(student_dir)},
            optim__steps=2,
            checkpoint_every=1,
        )
        with pytest.raises(StoreError, match=r"no space left on the device.*rerun with --resume"):
            run_train_cli(recipe, [], dry_run=False, resume=False, overwrite=False)
        assert not list((disk / "run").glob("checkpoints/.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
