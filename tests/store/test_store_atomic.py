"""A writer that dies mid-shard leaves no finished-looking shard; finalize refuses incomplete or bad shard sets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from store_helpers import make_plan, random_sequence, random_store, write_store

from alm.errors import StoreError
from alm.store.finalize import finalize_store, try_finalize
from alm.store.integrity import with_checksum
from alm.store.reader import open_store
from alm.store.writer import ShardWriter, prepare_store


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    plan = make_plan(num_shards=2)
    layout = prepare_store(tmp_path, plan)
    rng = np.random.default_rng(0)
    with (
        pytest.raises(RuntimeError, match="teacher crashed"),
        ShardWriter(layout, 0, chunk_tokens=8) as writer,
    ):
        for i in range(5):
            writer.add(**random_sequence(rng, i, plan))
        raise RuntimeError("teacher crashed")
    assert not layout.shard_done(0)
    assert os.listdir(tmp_path / "shards") == []  # the temp folder was removed too
    with pytest.raises(StoreError, match="unfinished"):
        open_store(tmp_path)


def test_sigkill_mid_shard_leaves_no_shard_and_rerun_completes(tmp_path):
    store = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from store_helpers import make_plan, random_sequence
        from alm.store.writer import ShardWriter, prepare_store
        plan = make_plan(num_shards=1)
        layout = prepare_store({str(store)!r}, plan)
        rng = np.random.default_rng(0)
        with ShardWriter(layout, 0, chunk_tokens=8, buffer_bytes=1) as writer:  # flush every chunk
            for i in range(10_000):
                writer.add(**random_sequence(rng, i, plan))
                if i == 20:
                    print("writing", flush=True)
                time.sleep(0.001)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = os.listdir(store / "shards")
    # killed mid-shard: only a temp folder and the dead writer's (stale) claim are left
    assert sorted(name.split("-")[0] for name in leftovers) == [".claim", ".tmp"]
    assert not (store / "shards" / "shard-00000").exists()
    with pytest.raises(StoreError, match="missing shard"):
        finalize_store(store)
    # a rerun of the same plan resumes: removes the stale temp folder, commits the shard, finalizes
    plan = make_plan(num_shards=1)
    layout = prepare_store(store, plan)
    assert not layout.shard_done(0)
    rng = np.random.default_rng(0)
    with ShardWriter(layout, 0) as writer:
        for i in range(3):
            writer.add(**random_sequence(rng, i, plan))
    assert os.listdir(store / "shards") == ["shard-00000"]
    assert try_finalize(layout) is not None
    assert open_store(store).num_sequences == 3


def test_try_finalize_waits_for_every_shard(tmp_path):
    plan = make_plan(num_shards=3)
    rng = np.random.default_rng(0)
    layout = prepare_store(tmp_path, plan)
    for j in range(3):
        assert try_finalize(layout) is None
        with ShardWriter(layout, j) as writer:
            writer.add(**random_sequence(rng, j, plan))
    first = try_finalize(layout)
    mtime = os.path.getmtime(first)
    time.sleep(0.01)
    # a finished store is left alone
    assert try_finalize(layout) == first and os.path.getmtime(first) == mtime
    assert open_store(tmp_path).num_sequences == 3


def _three_shard_store(tmp_path):
    plan = make_plan(num_shards=3)
    random_store(tmp_path, plan, num_per_shard=2, finalize=False)
    return plan


def test_finalize_refuses_missing_shard(tmp_path):
    _three_shard_store(tmp_path)
    shutil.rmtree(tmp_path / "shards" / "shard-00001")
    with pytest.raises(StoreError, match=r"missing shard\(s\) \[1\] of 3.*--shard j/3"):
        finalize_store(tmp_path)
    assert not (tmp_path / "alm-store.json").exists()


def test_finalize_refuses_duplicated_shard(tmp_path):
    _three_shard_store(tmp_path)
    shutil.copytree(tmp_path / "shards" / "shard-00002", tmp_path / "shards" / "shard-00002-copy")
    with pytest.raises(StoreError, match=r"shard 2 is present more than once"):
        finalize_store(tmp_path)
    assert not (tmp_path / "alm-store.json").exists()


def test_finalize_refuses_duplicated_sequences(tmp_path):
    plan = make_plan(num_shards=2)
    seq = random_sequence(np.random.default_rng(0), 7, plan)
    write_store(tmp_path, plan, [[seq], [seq]], finalize=False)
    with pytest.raises(StoreError, match=r"sequence id\(s\) \[7\] stored in both"):
        finalize_store(tmp_path)


def test_finalize_refuses_corrupt_array(tmp_path):
    _three_shard_store(tmp_path)
    chunk = tmp_path / "shards" / "shard-00001" / "arrays" / "logp" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(
        StoreError, match=r"shard-00001.*(crc32c differs|checksum differs|cannot read its arrays)"
    ):
        finalize_store(tmp_path)


def test_finalize_refuses_modified_array(tmp_path):
    _three_shard_store(tmp_path)
    arr = zarr.open_array(tmp_path / "shards" / "shard-00001" / "arrays" / "logp", mode="r+")
    arr[1] = arr[1] + 1.0
    with pytest.raises(StoreError, match=r"shard-00001/arrays/logp/c/0 .*crc32c differs"):
        finalize_store(tmp_path)


def test_finalize_refuses_shard_of_another_plan(tmp_path):
    _three_shard_store(tmp_path)
    other = tmp_path / "other"
    random_store(
        other, make_plan(num_shards=3, tokenizer_fingerprint="another-tokenizer"), finalize=False
    )
    shutil.rmtree(tmp_path / "shards" / "shard-00000")
    shutil.copytree(other / "shards" / "shard-00000", tmp_path / "shards" / "shard-00000")
    with pytest.raises(
        StoreError, match=r"shard-00000: plan_fingerprint.*tokenizer_fingerprint|plan_fingerprint"
    ):
        finalize_store(tmp_path)


def test_finalize_refuses_count_mismatch(tmp_path):
    _three_shard_store(tmp_path)
    meta = tmp_path / "shards" / "shard-00002" / "shard.json"
    doc = json.loads(meta.read_text())
    doc["num_sequences"] += 1
    meta.write_text(json.dumps(with_checksum(doc)))  # a consistent but wrong record
    with pytest.raises(StoreError, match=r"index has 2 rows"):
        finalize_store(tmp_path)


def test_unfinished_store_refused_by_open_store_but_inspectable(tmp_path):
    _three_shard_store(tmp_path)
    shutil.rmtree(tmp_path / "shards" / "shard-00001")
    with pytest.raises(StoreError, match=r"unfinished.*alm store finalize"):
        open_store(tmp_path)
    store = open_store(tmp_path, allow_unfinished=True)
    assert store.shard_indices == [0, 2] and store.num_sequences == 4 and not store.is_finished
    with pytest.raises(StoreError, match="no teacher store"):
        open_store(tmp_path / "nowhere")
