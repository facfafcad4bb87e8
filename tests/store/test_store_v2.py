"""Format version 2 stores stay readable (issue 11: bump the format version, keep reading older versions).

`tests/assets/store_v2/` was written by the version 2 code (commit cef15ce, the last before version 3) with

    PYTHONPATH=.:tests/store python -c "from store_helpers import make_plan, random_store;
        random_store('tests/assets/store_v2', make_plan(num_shards=2), num_per_shard=3, seed=5)"

so the values it holds are regenerated here with the same helper and seed, and compared exactly. Version 2
differs from version 3 in the index file (`index.arrow`, an Arrow IPC file with Zstd-compressed buffers) and in
the inventory checksums (sha256 rather than CRC-32C), both of which are still checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_plan, random_sequence

from alm.errors import StoreCorruptError, StoreError
from alm.store import schema
from alm.store.inspect import inspect_stats
from alm.store.reader import open_store
from alm.store.writer import prepare_store

V2_STORE = Path(__file__).resolve().parents[1] / "assets" / "store_v2"


def expected_sequences() -> list[dict]:
    plan = make_plan(num_shards=2)
    rng = np.random.default_rng(5)
    return [random_sequence(rng, j * 1000 + i, plan) for j in range(2) for i in range(3)]


def test_v2_store_reads_back_the_values_the_v2_code_wrote():
    store = open_store(V2_STORE)
    assert store.format_version == 2
    shard_dir = V2_STORE / "shards" / "shard-00000"
    assert (shard_dir / schema.INDEX_FILE_V2).is_file()
    assert not (shard_dir / schema.INDEX_FILE).exists()
    files = json.loads((shard_dir / schema.SHARD_FILE).read_text())["files"]
    assert all("sha256" in entry and "crc32c" not in entry for entry in files.values())
    got = list(store)
    want = expected_sequences()
    assert [s.seq_id for s in got] == [w["seq_id"] for w in want]
    for seq, ref in zip(got, want, strict=True):
        assert seq.text == ref["text"]
        assert seq.doc_id == ref["doc_id"] and seq.row == ref["row"]
        assert seq.truncated == ref["truncated"]
        np.testing.assert_array_equal(seq.token_id, ref["token_id"])
        np.testing.assert_array_equal(seq.logp, ref["logp"])  # NaN at 0 on both sides
        np.testing.assert_array_equal(
            seq.boundary_logmass, ref["boundary_logmass"].astype(np.float32)
        )
        np.testing.assert_array_equal(seq.topk_id, ref["topk_id"])
        np.testing.assert_array_equal(seq.topk_logp, ref["topk_logp"].astype(np.float32))
        assert [s["role"] for s in seq.segments] == [s["role"] for s in ref["segments"]]


@pytest.mark.parametrize("rel", ["index.arrow", "arrays/logp/c/0"])
def test_v2_store_with_one_changed_byte_is_refused_by_its_sha256_inventory(tmp_path, rel):
    copy = tmp_path / "store"
    shutil.copytree(V2_STORE, copy)
    path = copy / "shards" / "shard-00001" / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=rf"shard-00001/{rel} .*sha256 differs"):
        list(open_store(copy))


def test_v2_store_is_inspected_like_a_current_store():
    stats = inspect_stats(V2_STORE)
    assert stats["num_sequences"] == 6
    assert stats["disk_bytes_index"] > 0


def test_v2_store_is_never_extended_by_this_version(tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(V2_STORE, copy)
    with pytest.raises(
        StoreError,
        match=rf"format version 2, this alm writes version {schema.FORMAT_VERSION}.*--overwrite",
    ):
        prepare_store(copy, make_plan(num_shards=2))
