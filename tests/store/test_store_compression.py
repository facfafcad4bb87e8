"""The `compression` presets (small, fast, none) and the threaded whole-shard read: every preset stores the same
values, plain zarr + pyarrow read each of them, the plan records a non-default preset, and reads with any number
of threads return the same shard and name the same damaged file."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr
from store_helpers import make_plan, random_store

from alm.errors import StoreCorruptError, StoreError
from alm.store import reader, schema
from alm.store.reader import open_store
from alm.store.writer import StorePlan


def _assert_same_shards(a, b) -> None:
    assert a.shard_indices == b.shard_indices
    for j in a.shard_indices:
        x, y = a.read_shard(j), b.read_shard(j)
        assert x.index.equals(y.index)
        assert x.arrays.keys() == y.arrays.keys()
        for name in x.arrays:
            assert x.arrays[name].dtype == y.arrays[name].dtype
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name])


@pytest.mark.parametrize("compression", ["fast", "none"])
def test_every_preset_stores_the_same_values_and_plain_zarr_and_pyarrow_read_it(
    tmp_path, compression
):
    # the same seed: the same sequences go into both
    random_store(tmp_path / "small", make_plan(precision="compact"), chunk_tokens=16)
    random_store(
        tmp_path / compression,
        make_plan(precision="compact", compression=compression),
        chunk_tokens=16,
    )
    _assert_same_shards(open_store(tmp_path / "small"), open_store(tmp_path / compression))

    shard = tmp_path / compression / "shards" / "shard-00000"
    got = open_store(tmp_path / compression).read_shard(0)
    for name in ("token_id", "logp", "boundary_logmass", "topk_id", "topk_logp"):
        meta = json.loads((shard / "arrays" / name / "zarr.json").read_text())
        codecs = [c["name"] for c in meta["codecs"]]
        if compression == "none" or name in ("boundary_logmass", "topk_logp"):
            assert codecs == ["bytes"]  # `fast` stores the float16 fields uncompressed
        else:
            assert codecs == ["bytes", "blosc"]
            assert meta["codecs"][1]["configuration"]["cname"] == "lz4hc"
        plain = zarr.open_array(str(shard / "arrays" / name), mode="r")[...]
        np.testing.assert_array_equal(plain, got.arrays[name])
    index_path = str(shard / schema.INDEX_FILE)
    plain_index = pa.ipc.open_stream(pa.input_stream(index_path, compression="zstd")).read_all()
    assert plain_index.equals(got.index)
    # the index is stored, not compressed: the file is the Arrow stream plus a few bytes of Zstd framing
    raw_size = len(pa.input_stream(index_path, compression="zstd").read())
    assert raw_size < Path(index_path).stat().st_size < raw_size + 64


def test_the_plan_records_a_preset_other_than_the_default(tmp_path):
    random_store(tmp_path / "a", make_plan(), chunk_tokens=16)
    random_store(tmp_path / "b", make_plan(compression="fast"), chunk_tokens=16)
    plan_a = json.loads((tmp_path / "a" / schema.PLAN_FILE).read_text())["plan"]
    plan_b = json.loads((tmp_path / "b" / schema.PLAN_FILE).read_text())["plan"]
    # a default plan is the plan of the alm versions before the presets (same identity, same fingerprint)
    assert "compression" not in plan_a and plan_b["compression"] == "fast"
    assert StorePlan.from_json(plan_a).compression == "small"
    assert StorePlan.from_json(plan_b) == make_plan(compression="fast")
    assert make_plan().fingerprint() != make_plan(compression="fast").fingerprint()
    assert open_store(tmp_path / "b").manifest.plan["compression"] == "fast"
    # the store card names the preset
    assert "compression `small`" in (tmp_path / "a" / "README.md").read_text()
    assert "compression `fast`" in (tmp_path / "b" / "README.md").read_text()


def test_an_unknown_preset_is_refused():
    with pytest.raises(
        StoreError, match=r"store compression 'lz4'; use one of \['small', 'fast', 'none'\]"
    ):
        make_plan(compression="lz4")


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 17, (1 << 17) + 1, 3 * (1 << 17) + 5])
def test_a_raw_zstd_frame_is_read_by_any_zstd_decoder(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size).astype(np.uint8).tobytes()
    frame = schema.zstd_raw_frame(data)
    blocks = max(1, -(-size // (1 << 17)))
    assert (
        len(frame) == 4 + 2 + 8 + 3 * blocks + size
    )  # magic, descriptor + window, content size, blocks
    assert schema.zstd_content_size(frame[:18]) == size
    assert pa.Codec("zstd").decompress(frame, decompressed_size=size, asbytes=True) == data
    path = tmp_path / "frame.zst"
    path.write_bytes(frame)
    assert pa.input_stream(str(path), compression="zstd").read() == data  # a streaming decoder


def _shards(store, threads):
    return [store.read_shard(j, threads=threads) for j in store.shard_indices]


@pytest.mark.parametrize("compression", schema.COMPRESSIONS)
def test_reads_with_threads_return_the_same_shards(tmp_path, compression):
    random_store(
        tmp_path, make_plan(num_shards=2, compression=compression), num_per_shard=6, chunk_tokens=8
    )
    store = open_store(tmp_path)
    one, many = _shards(store, 1), _shards(store, 3)
    for x, y in zip(one, many):
        assert x.index.equals(y.index)
        for name in x.arrays:
            np.testing.assert_array_equal(x.arrays[name], y.arrays[name])


@pytest.mark.parametrize("threads", [1, 3])
def test_with_threads_the_first_damaged_file_is_named(tmp_path, threads):
    random_store(tmp_path, make_plan(num_shards=1), num_per_shard=6, chunk_tokens=8)
    shard = tmp_path / "shards" / "shard-00000"
    for rel in ("arrays/logp/c/2", "arrays/boundary_logmass/c/4/0"):
        data = bytearray((shard / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (shard / rel).write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"file shards/shard-00000/arrays/logp/c/2 has"):
        open_store(tmp_path).read_shard(0, threads=threads)


def test_read_threads_follows_the_environment(monkeypatch):
    monkeypatch.setenv("ALM_STORE_READ_THREADS", "3")
    assert reader.read_threads() == 3
    monkeypatch.setenv("ALM_STORE_READ_THREADS", "0")
    assert reader.read_threads() == 1
    monkeypatch.delenv("ALM_STORE_READ_THREADS")
    assert 1 <= reader.read_threads() <= reader.MAX_READ_THREADS
    monkeypatch.setenv("ALM_STORE_READ_THREADS", "many")
    with pytest.raises(StoreError, match="ALM_STORE_READ_THREADS='many' is not a whole number"):
        reader.read_threads()


def _read_in_child(root: str, queue) -> None:
    store = open_store(root)
    queue.put([s.arrays["logp"].tolist() for s in _shards(store, 2)])


def test_a_forked_reader_uses_its_own_thread_pool(tmp_path):
    random_store(tmp_path, make_plan(num_shards=2), num_per_shard=4, chunk_tokens=8)
    parent = [
        s.arrays["logp"] for s in _shards(open_store(tmp_path), 2)
    ]  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(str(tmp_path), queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    for a, b in zip(parent, got):
        np.testing.assert_array_equal(a, np.asarray(b, dtype=np.float32))
