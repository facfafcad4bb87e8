"""Verified store reads in forked DataLoader workers (issue 9): the checks hold no thread pool or lock that a
fork could copy in a bad state.

What the read path runs: a decode thread pool made per process (`alm.store.reader._read_pool`, its lock made new
in a forked child), CRC-32C (`google_crc32c`, a pure C function) and sha256 (`hashlib`) for the checks,
single-call Blosc decompression (zarr sets `numcodecs.blosc.use_threads = False`, so no global Blosc context), a
one-shot Zstd decode and Arrow IPC read for the index, and Arrow's Parquet reader for the vocabulary (its thread
pool re-creates itself after a fork). These tests make the parent use every one of them first (with Blosc's
global thread pool switched on as well), then fork real DataLoader workers that read and check every shard of a
real store: the same bytes as the parent, a damaged file still one `StoreCorruptError`, and no hang (the
loader's `timeout` turns one into a failure), also when a parent thread holds the decode pool's lock at the fork.
Every process decodes with two threads here (`ALM_STORE_READ_THREADS=2`), so the pool exists on any machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from alm.errors import StoreCorruptError
from alm.store.reader import TeacherStore, open_store

NUM_WORKERS = 2
ROUNDS = 3  # every shard read this many times, spread over the workers


def _digest(store: TeacherStore, shard_index: int) -> str:
    shard = store.read_shard(shard_index)
    digest = hashlib.sha256()
    for name in sorted(shard.arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(shard.arrays[name]).tobytes())
    for text in shard.index.column("text").to_pylist():
        digest.update(text)
    return digest.hexdigest()


class _ShardDigests(Dataset):
    """Item i: the digest of shard i % num_shards, read (and checked) in whichever process asks."""

    def __init__(self, store: TeacherStore) -> None:
        self.store = store  # inherited by the forked workers, with its checked files
        self.shards = list(store.shard_indices)

    def __len__(self) -> int:
        return len(self.shards) * ROUNDS

    def __getitem__(self, i: int) -> tuple[int, str, int]:
        j = self.shards[i % len(self.shards)]
        return j, _digest(self.store, j), os.getpid()


def _forked_loader(dataset: Dataset) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=NUM_WORKERS,
        multiprocessing_context="fork",
        timeout=120,  # a deadlocked worker fails the test instead of hanging it
    )


@pytest.fixture
def blosc_threads():
    """Blosc's global context and thread pool on, in the parent (zarr leaves it off): the harder case."""
    from numcodecs import blosc

    before = blosc.use_threads
    blosc.use_threads = True
    blosc.set_nthreads(4)
    try:
        yield
    finally:
        blosc.use_threads = before


@pytest.fixture(autouse=True)
def decode_threads(monkeypatch):
    """Two decode threads in every process (the parent and the forked workers), whatever this machine's CPUs."""
    monkeypatch.setenv("ALM_STORE_READ_THREADS", "2")


@pytest.mark.parametrize("threads", [False, True], ids=["zarr-default", "blosc-threads-on"])
def test_forked_dataloader_workers_read_and_check_every_shard_like_the_parent(
    stores, request, threads
):
    if threads:
        request.getfixturevalue("blosc_threads")
    store = open_store(stores["train"])  # hidden states too: every array kind
    _ = store.vocab  # Arrow's Parquet reader, in the parent
    want = {j: _digest(store, j) for j in store.shard_indices}  # Blosc, Zstd, CRC-32C in the parent
    got = list(_forked_loader(_ShardDigests(store)))
    assert len(got) == len(want) * ROUNDS
    assert all(digest == want[j] for j, digest, _ in got)
    pids = {pid for _, _, pid in got}
    assert len(pids) == NUM_WORKERS and os.getpid() not in pids  # read in the forked workers


def test_a_damaged_shard_read_in_a_forked_worker_is_the_store_error(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores["train"], copy)
    store = open_store(copy)
    for j in store.shard_indices:
        _digest(store, j)  # the parent read everything first
    chunk = copy / "shards" / "shard-00001" / "arrays" / "logp" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(
        StoreCorruptError, match=r"shard 1, file shards/shard-00001/arrays/logp/c/0"
    ):
        list(_forked_loader(_ShardDigests(store)))


def test_a_fork_while_a_parent_thread_holds_the_read_pools_lock_does_not_hang(stores):
    from alm.store import reader

    store = open_store(stores["plain"])
    want = {j: _digest(store, j) for j in store.shard_indices}  # the parent's pool exists
    with reader._pool_lock:  # held by another parent thread at the moment the workers fork
        batches = iter(_forked_loader(_ShardDigests(store)))
    got = list(batches)
    assert len(got) == len(want) * ROUNDS and all(d == want[j] for j, d, _ in got)
