"""The typed manifest (`alm.store.manifest.StoreManifest`) and the one shard layout (`schema.shard_path`).

The expected values come from the plan the store was written with and from the on-disk JSON read with plain
`json`, not from the manifest model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_helpers import make_plan, random_store

from alm.errors import StoreCorruptError
from alm.store import integrity, schema
from alm.store.manifest import StoreManifest
from alm.store.reader import open_store

V1_STORE = Path(__file__).resolve().parents[1] / "assets" / "store_v1"


def test_shard_layout_names_the_folders_the_writer_creates(tmp_path):
    plan = make_plan(num_shards=3)
    random_store(tmp_path, plan, num_per_shard=2, seed=1)
    folders = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert folders == ["shard-00000", "shard-00001", "shard-00002"]
    assert [schema.shard_path(j) for j in range(3)] == [f"shards/{name}" for name in folders]
    assert all(schema.SHARD_DIR_PATTERN.fullmatch(name) for name in folders)
    assert schema.claim_path(7) == "shards/.claim-shard-00007.json"
    assert schema.temp_shard_prefix(7).startswith(schema.TEMP_SHARD_DIR_PREFIX)


def test_typed_manifest_of_a_finished_store_matches_its_json_and_plan(tmp_path):
    plan = make_plan(num_shards=2)
    shards = random_store(tmp_path, plan, num_per_shard=3, seed=2)
    doc = json.loads((tmp_path / schema.MANIFEST_FILE).read_text())
    manifest = open_store(tmp_path).manifest
    assert manifest.finished and manifest.format_version == schema.FORMAT_VERSION == 3
    assert manifest.teacher_model == plan.teacher_model == "tiny-teacher"
    assert (
        manifest.tokenizer_fingerprint == "tok-fp" and manifest.data_spec_fingerprint == "data-fp"
    )
    assert manifest.data_spec_name == "unit" and manifest.max_length == 64 and manifest.top_k == 4
    assert manifest.backend == "hf" and manifest.boundary_method == "exact"
    assert manifest.num_shards == 2 and manifest.shard_indices == [0, 1]
    assert manifest.plan_fingerprint == plan.fingerprint()
    assert list(manifest.fields) == list(plan.fields)
    assert manifest.num_sequences == 6 == doc["totals"]["num_sequences"]
    assert manifest.num_tokens == sum(len(s["token_id"]) for shard in shards for s in shard)
    assert dict(manifest.recorded_totals) == doc["totals"]
    assert [r.path for r in manifest.shards] == [s["path"] for s in doc["shards"]]
    assert all(r.checksum == s["checksum"] for r, s in zip(manifest.shards, doc["shards"]))


def test_v1_manifest_reads_into_the_same_model():
    doc = json.loads((V1_STORE / schema.MANIFEST_FILE).read_text())
    manifest = open_store(V1_STORE).manifest
    assert manifest.format_version == 1
    assert manifest.teacher_model == doc["teacher"]["model"] == "tiny-teacher"
    assert manifest.tokenizer_fingerprint == "tok-fp"
    assert manifest.shard_indices == [0, 1] and manifest.num_sequences == 6
    assert manifest.top_k == 4 and manifest.hidden_size == 0 and manifest.hidden_encoding is None
    assert manifest.shards[0].checksum is None  # v1 wrote no shard checksums
    assert manifest.shards[0].index_sha256 == doc["shards"][0]["index_sha256"]


def test_unfinished_store_has_the_facts_of_its_plan_and_committed_shards(tmp_path):
    plan = make_plan(num_shards=3)
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    random_store(finished, plan, num_per_shard=2, seed=3)
    random_store(unfinished, plan, num_per_shard=2, seed=3, finalize=False)
    (unfinished / schema.shard_path(1) / schema.SHARD_FILE).unlink()  # shard 1 not committed
    want = open_store(finished).manifest
    got = open_store(unfinished, allow_unfinished=True).manifest
    assert not got.finished and got.shard_indices == [0, 2]
    for name in (
        "teacher_model",
        "tokenizer_fingerprint",
        "data_spec_fingerprint",
        "fields",
        "top_k",
        "max_length",
        "num_shards",
        "plan_fingerprint",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert got.num_tokens == want.shard(0).num_tokens + want.shard(2).num_tokens


def test_manifest_without_its_shard_list_is_reported_as_damaged(tmp_path):
    random_store(tmp_path, make_plan(num_shards=1), num_per_shard=2, seed=4)
    path = tmp_path / schema.MANIFEST_FILE
    doc = json.loads(path.read_text())
    del doc["shards"], doc["checksum"]
    path.write_bytes(schema.json_bytes(integrity.with_checksum(doc)))
    with pytest.raises(StoreCorruptError, match="lacks a required entry"):
        open_store(tmp_path)
    with pytest.raises(KeyError):
        StoreManifest.from_json(doc)
