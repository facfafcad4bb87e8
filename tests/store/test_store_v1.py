"""Format version 1 stores stay readable (issue 11: bump the format version, keep reading v1).

`tests/assets/store_v1/` was written by the version 1 code (commit d2512e4, the last before version 2) with

    PYTHONPATH=<v1 checkout>:<v1 checkout>/tests/store python -c "from store_helpers import make_plan, random_store;
        random_store('tests/assets/store_v1', make_plan(num_shards=2), num_per_shard=3, seed=5)"

so the values it holds are regenerated here with the same helper and seed, and compared exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_plan, random_sequence

from alm.errors import StoreError
from alm.store import schema
from alm.store.inspect import inspect_stats
from alm.store.reader import open_store
from alm.store.writer import prepare_store

V1_STORE = Path(__file__).resolve().parents[1] / "assets" / "store_v1"


def expected_sequences() -> list[dict]:
    plan = make_plan(num_shards=2)
    rng = np.random.default_rng(5)
    return [random_sequence(rng, j * 1000 + i, plan) for j in range(2) for i in range(3)]


def test_v1_store_reads_back_the_values_the_v1_code_wrote():
    store = open_store(V1_STORE)
    assert store.format_version == 1
    assert (V1_STORE / "shards" / "shard-00000" / schema.INDEX_FILE_V2).is_file()
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


def test_v1_store_is_inspected_like_a_v2_store():
    stats = inspect_stats(V1_STORE)
    assert stats["num_sequences"] == 6
    assert stats["disk_bytes_index"] > 0


def test_v1_store_is_never_extended_by_this_version(tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(V1_STORE, copy)
    plan_v2 = make_plan(num_shards=2)
    with pytest.raises(
        StoreError,
        match=rf"format version 1, this alm writes version {schema.FORMAT_VERSION}.*--overwrite",
    ):
        prepare_store(copy, plan_v2)
