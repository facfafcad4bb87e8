"""One writer per shard (an atomic claim), the vocabulary written once, and a full disk that ends in a message with
nothing partial left (issue 9 items 3-4). Real processes, a real tmpfs where mounting is allowed."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_plan, random_sequence, random_store

from alm.errors import StoreBusyError, StoreError
from alm.store.reader import open_store
from alm.store.writer import ShardClaim, ShardWriter, prepare_store

REPO = Path(__file__).resolve().parents[2]


def _holder(store: Path, shard: int) -> subprocess.Popen:
    """A real process that claims shard `shard` and then waits (as a worker busy scoring would)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO / "tests" / "store")!r})
        from store_helpers import make_plan
        from alm.store.writer import ShardClaim, prepare_store
        layout = prepare_store({str(store)!r}, make_plan(num_shards=2))
        claim = ShardClaim(layout, {shard})
        claim.acquire()
        print("claimed", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "claimed"
    return proc


def test_a_second_writer_of_a_shard_is_refused_naming_the_holder(tmp_path):
    plan = make_plan(num_shards=2)
    holder = _holder(tmp_path, 0)
    try:
        layout = prepare_store(tmp_path, plan)
        with pytest.raises(StoreBusyError) as err, ShardWriter(layout, 0):
            pass
        message = str(err.value)
        assert f"host {socket.gethostname()!r} pid {holder.pid}" in message
        assert "--shard i/N" in message
        assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "shards").iterdir())
        # the other shard is free
        with ShardWriter(layout, 1) as writer:
            writer.add(**random_sequence(np.random.default_rng(0), 1, plan))
        assert layout.shard_done(1)
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its claim is stale and taken over; the shard commits, the claim is released
    with ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(1), 0, plan))
    assert layout.shard_done(0)
    assert not (tmp_path / "shards" / ".claim-shard-00000.json").exists()


def test_a_claim_from_another_host_is_never_taken_over(tmp_path):
    layout = prepare_store(tmp_path, make_plan(num_shards=1))
    claim = tmp_path / "shards" / ".claim-shard-00000.json"
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text('{"host": "node-17", "pid": 1, "started_at": "2026-01-01T00:00:00Z"}')
    with pytest.raises(StoreBusyError, match=r"host 'node-17' pid 1 .*remove .*claim-shard-00000"):
        ShardClaim(layout, 0).acquire()


def test_the_claim_is_reentrant_within_one_process(tmp_path):
    plan = make_plan(num_shards=1)
    layout = prepare_store(tmp_path, plan)
    with ShardClaim(layout, 0), ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(0), 0, plan))
        assert (tmp_path / "shards" / ".claim-shard-00000.json").exists()
    assert not (tmp_path / "shards" / ".claim-shard-00000.json").exists()


def test_the_vocabulary_is_written_once(tmp_path):
    from factories import byte_tokenizer

    from alm.vocab import vocab_from_tokenizer

    vocab = vocab_from_tokenizer(byte_tokenizer())
    layout = prepare_store(tmp_path, make_plan(num_shards=1))
    layout.write_vocab(vocab)
    table = tmp_path / "vocab" / "teacher_vocab.parquet"
    before = table.stat()
    prepare_store(tmp_path, make_plan(num_shards=1)).write_vocab(vocab)  # a resumed worker
    after = table.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: str):
    path.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no `mount` command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_ends_in_a_message_and_leaves_the_previous_state_intact(tmp_path):
    plan = make_plan(num_shards=3)
    rng = np.random.default_rng(0)
    with _small_tmpfs(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", "600k") as disk:
        store = disk / "store"
        layout = prepare_store(store, plan)
        with ShardWriter(layout, 0) as writer:  # a small shard fits
            writer.add(**random_sequence(rng, 0, plan, n=20))
        with (
            pytest.raises(StoreError, match=r"no space left on the device.*rerun the same command"),
            ShardWriter(layout, 1, chunk_tokens=1024) as writer,
        ):
            for i in range(400):  # ~2 MB of arrays: more than the disk holds
                writer.add(**random_sequence(rng, 1000 + i, plan, n=39))
        # nothing partial: no temp shard, no temp file, no claim; shard 0 still reads back
        leftovers = [p.name for p in store.rglob("*") if ".tmp" in p.name or ".claim" in p.name]
        assert leftovers == []
        assert layout.done_shards() == [0]
        # the manifest write itself fails cleanly too when the disk is full
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
        from alm.store._fs import locate

        with pytest.raises(StoreError, match="no space left"):
            locate(store).write_bytes(b"x" * 200_000, "alm-store.json")
        assert not (store / "alm-store.json").exists()
        assert not [p for p in store.iterdir() if ".tmp" in p.name]
        filler.unlink()


def test_a_writer_killed_mid_shard_leaves_a_stale_claim_the_next_writer_takes(tmp_path):
    plan = make_plan(num_shards=1)
    random_store(tmp_path / "reference", plan, num_per_shard=3)
    holder = _holder(tmp_path / "store", 0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    layout = prepare_store(tmp_path / "store", make_plan(num_shards=2))
    with ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(0), 0, layout.plan))
    assert open_store(tmp_path / "reference").num_sequences == 3
    assert layout.shard_done(0)


def test_overwrite_moves_the_old_store_aside_and_deletes_only_alm_files_once_the_new_one_is_done(
    tmp_path,
):
    from alm.store.finalize import finalize_store

    old_plan, new_plan = (
        make_plan(num_shards=2),
        make_plan(num_shards=1, data_spec_fingerprint="new"),
    )
    random_store(tmp_path, old_plan, num_per_shard=2)
    user_files = {
        "shards/user_notes.txt": b"my notes",
        "shards/shard-00000/README.txt": b"shard notes",
        "vocab/NOTES.md": b"vocab notes",
        "mine.txt": b"top-level file of mine",
    }
    for rel, data in user_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    old_chunk = (tmp_path / "shards/shard-00001/arrays/logp/c/0").read_bytes()
    layout = prepare_store(tmp_path, new_plan, overwrite=True)
    # nothing is deleted before the replacement is complete: the old store sits in one aside folder
    (aside,) = tmp_path.glob(".alm-replaced-*")
    assert (aside / "shards/shard-00001/arrays/logp/c/0").read_bytes() == old_chunk
    assert layout.done_shards() == []
    with ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(5), 0, new_plan))
    finalize_store(tmp_path)
    assert not list(tmp_path.glob(".alm-replaced-*"))  # alm's old files are gone
    for rel, data in user_files.items():  # the user's files are back where they were
        assert (tmp_path / rel).read_bytes() == data, rel
    assert not (tmp_path / "shards/shard-00001").exists()
    assert sorted(p.name for p in (tmp_path / "shards/shard-00000").iterdir()) == [
        "README.txt",
        "arrays",
        "index.arrows.zst",
        "shard.json",
    ]
    assert open_store(tmp_path).num_sequences == 1
