"""Stores written to an fsspec object store (`memory://` here): `--overwrite` keeps the old store until the new one
is finished and never deletes a file alm did not write; one writer per shard through an exclusive-create claim;
push and pull never write into or delete from another store (issue 9 item 4, `docs/store.md` "Object stores").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest
from store_helpers import make_plan, random_sequence, random_store

from alm.errors import StoreBusyError, StoreError
from alm.store._fs import locate
from alm.store.finalize import finalize_store
from alm.store.reader import open_store
from alm.store.transfer import pull_store, push_store
from alm.store.writer import ShardClaim, ShardWriter, prepare_store

USER_FILES = {
    "shards/user_notes.txt": b"my notes",
    "shards/shard-00000/README.txt": b"shard notes",
    "vocab/NOTES.md": b"vocab notes",
    "mine.txt": b"top-level file of mine",
}


def _url() -> str:
    return f"memory://alm-test-{uuid.uuid4().hex[:8]}/store"


def _files(url: str) -> dict[str, bytes]:
    location = locate(url)
    return {
        p[len(location.root) + 1 :]: location.fs.cat_file(p)
        for p in location.fs.find(location.root)
    }


def test_overwrite_on_an_object_store_keeps_the_old_store_until_the_new_one_is_finished(tmp_path):
    url = _url()
    old_plan = make_plan(num_shards=2)
    new_plan = make_plan(num_shards=1, data_spec_fingerprint="new")
    random_store(url, old_plan, num_per_shard=2)
    old_files = _files(url)
    fs = fsspec.filesystem("memory")
    for rel, data in USER_FILES.items():
        fs.pipe_file(f"{locate(url).root}/{rel}", data)

    layout = prepare_store(url, new_plan, overwrite=True)
    # nothing deleted yet: every file of the old store sits, byte for byte, in one aside folder, which still
    # opens as the old store; the user's files did not move
    location = locate(url)
    (aside,) = [n for n in location.listdir() if n.startswith(".alm-replaced-")]
    assert _files(f"{url}/{aside}") == old_files
    assert open_store(f"{url}/{aside}").num_sequences == 4
    for rel, data in USER_FILES.items():
        assert location.read_bytes(rel) == data, rel
    assert layout.done_shards() == []

    with ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(5), 0, new_plan))
    finalize_store(url)
    # finished: the old store's files are gone, the user's are where they were
    assert not [n for n in location.listdir() if n.startswith(".alm-replaced-")]
    after = _files(url)
    for rel, data in USER_FILES.items():
        assert after[rel] == data, rel
    assert not [rel for rel in after if rel.startswith("shards/shard-00001/")]
    assert open_store(url).num_sequences == 1


def test_overwrite_keeps_a_users_file_put_into_the_aside_folder(tmp_path):
    url = _url()
    random_store(url, make_plan(num_shards=1), num_per_shard=1)
    layout = prepare_store(
        url, make_plan(num_shards=1, data_spec_fingerprint="new"), overwrite=True
    )
    location = locate(url)
    (aside,) = [n for n in location.listdir() if n.startswith(".alm-replaced-")]
    location.write_bytes(b"mine", aside, "shards/keep_me.txt")
    with ShardWriter(layout, 0) as writer:
        writer.add(**random_sequence(np.random.default_rng(1), 0, layout.plan))
    finalize_store(url)
    assert _files(f"{url}/{aside}") == {"shards/keep_me.txt": b"mine"}


def test_a_second_writer_of_an_object_store_shard_is_refused_naming_the_holder():
    url = _url()
    plan = make_plan(num_shards=2)
    layout = prepare_store(url, plan)
    with ShardClaim(layout, 0) as claim:  # a claim by this process: re-entrant for its own writer
        assert claim.held
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        try:
            # the same claim as another live process on this host would write it
            location = locate(url)
            location.fs.pipe_file(
                location.path("shards/.claim-shard-00001.json"),
                f'{{"host": "{socket.gethostname()}", "pid": {holder.pid}, "started_at": "now"}}'.encode(),
            )
            with pytest.raises(StoreBusyError) as err, ShardWriter(layout, 1):
                pass
            assert f"host {socket.gethostname()!r} pid {holder.pid}" in str(err.value)
            assert "two workers were given the same shard" in str(err.value)
        finally:
            holder.kill()
            holder.wait()
        # its process is gone: the claim is stale and the next writer takes it over
        with ShardWriter(layout, 1) as writer:
            writer.add(**random_sequence(np.random.default_rng(2), 1000, plan))
        with ShardWriter(layout, 0) as writer:
            writer.add(**random_sequence(np.random.default_rng(3), 0, plan))
    location = locate(url)
    assert not [n for n in location.listdir("shards") if n.startswith(".claim-")]  # released
    assert layout.done_shards() == [0, 1]


def test_an_object_store_claim_from_another_host_is_never_taken_over():
    url = _url()
    layout = prepare_store(url, make_plan(num_shards=1))
    location = locate(url)
    location.fs.pipe_file(
        location.path("shards/.claim-shard-00000.json"),
        b'{"host": "elsewhere", "pid": 1, "started_at": "then"}',
    )
    with pytest.raises(StoreBusyError, match=r"host 'elsewhere' pid 1.*remove .*claim-shard-00000"):
        ShardClaim(layout, 0).acquire()


def test_a_killed_object_store_writer_leaves_no_trusted_shard_and_no_user_file_is_removed():
    url = _url()
    plan = make_plan(num_shards=1)
    layout = prepare_store(url, plan)
    location = locate(url)
    with pytest.raises(RuntimeError), ShardWriter(layout, 0, chunk_tokens=8) as writer:
        for i in range(30):
            writer.add(**random_sequence(np.random.default_rng(i), i, plan))
        location.write_bytes(b"mine", "shards/shard-00000/NOTES.txt")
        raise RuntimeError("the worker dies mid-shard")
    assert not layout.shard_done(0)
    assert _files(url)["shards/shard-00000/NOTES.txt"] == b"mine"
    assert not [n for n in location.listdir("shards") if n.startswith(".claim-")]


def test_push_and_pull_never_replace_another_store(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    random_store(first, make_plan(num_shards=1), num_per_shard=2)
    random_store(second, make_plan(num_shards=1, data_spec_fingerprint="other"), num_per_shard=2)
    url = _url()
    push_store(first, url)
    before = _files(url)
    with pytest.raises(StoreError, match="already holds another finished teacher store"):
        push_store(second, url)
    assert _files(url) == before
    target = tmp_path / "pulled"
    pull_store(url, target)
    with pytest.raises(StoreError, match="already holds another finished teacher store"):
        pull_store(_push(second), target)
    assert open_store(target).manifest.data_spec_fingerprint == "data-fp"
    assert sorted(os.listdir(target)) == sorted([*os.listdir(first), "alm-store.files.json"])


def _push(store) -> str:
    url = _url()
    push_store(store, url)
    return url
