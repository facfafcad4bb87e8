"""Every read checks what it reads: a missing, truncated or changed store file is a `StoreCorruptError` naming the
store, the shard and the file, never zeros or a silent skip (DESIGN.md "Stores never lie")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_plan, random_store

from alm.errors import StoreCorruptError, StoreError
from alm.store.integrity import document_problem, with_checksum
from alm.store.reader import open_store


def _store(tmp_path: Path) -> Path:
    random_store(tmp_path, make_plan(num_shards=2), num_per_shard=5, chunk_tokens=16)
    (tmp_path / "vocab" / "tokenizer").mkdir(parents=True)
    return tmp_path


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


SHARD = Path("shards") / "shard-00001"
SHARD_FILES = [
    SHARD / "arrays" / "zarr.json",
    SHARD / "arrays" / "logp" / "zarr.json",
    SHARD / "arrays" / "logp" / "c" / "0",
    SHARD / "arrays" / "token_id" / "c" / "1",
    SHARD / "arrays" / "boundary_logmass" / "c" / "0" / "0",
    SHARD / "arrays" / "topk_id" / "c" / "0" / "0",
    SHARD / "index.arrows.zst",
    SHARD / "shard.json",
]


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("rel", SHARD_FILES, ids=lambda p: str(p))
def test_a_damaged_shard_file_is_named_when_its_shard_is_read(tmp_path, rel, fault):
    root = _store(tmp_path)
    store = open_store(root)
    expected = {j: store.read_shard(j) for j in store.shard_indices}  # intact reads work
    target = root / rel
    {"flip": _flip, "truncate": _truncate, "delete": Path.unlink}[fault](target)
    store = open_store(root)
    np.testing.assert_array_equal(store.read_shard(0).arrays["logp"], expected[0].arrays["logp"])
    with pytest.raises(StoreCorruptError) as err:
        store.read_shard(1)
    message = str(err.value)
    assert f"{root} is damaged: shard 1, file {rel.as_posix()}" in message
    assert "alm precompute RECIPE --shard 1/2" in message and "alm verify" in message


def test_a_deleted_chunk_is_an_error_not_zeros(tmp_path):
    root = _store(tmp_path)
    for chunk in (root / SHARD / "arrays" / "logp" / "c").iterdir():
        chunk.unlink()
    with pytest.raises(StoreCorruptError, match=r"arrays/logp/c/0 is missing"):
        list(open_store(root).iter_sequences())


def test_a_missing_shard_folder_is_named(tmp_path):
    root = _store(tmp_path)
    shutil.rmtree(root / SHARD)
    with pytest.raises(StoreCorruptError, match=r"shard 1, file shards/shard-00001 is missing"):
        open_store(root).read_shard(1)


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("rel", ["alm-store.json", "alm-store.plan.json"])
def test_a_damaged_manifest_or_plan_is_refused_at_open(tmp_path, rel, fault):
    root = _store(tmp_path)
    {"flip": _flip, "truncate": _truncate, "delete": Path.unlink}[fault](root / rel)
    if rel == "alm-store.json" and fault == "delete":
        with pytest.raises(StoreError, match="unfinished"):
            open_store(root)
        return
    with pytest.raises(StoreCorruptError, match=rf"is damaged: file {rel}"):
        open_store(root)


def test_a_changed_value_in_the_manifest_is_caught_by_its_checksum(tmp_path):
    root = _store(tmp_path)
    manifest = json.loads((root / "alm-store.json").read_text())
    manifest["totals"]["num_tokens"] += 1  # still valid JSON, still plausible
    (root / "alm-store.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match=r"alm-store.json its content does not match"):
        open_store(root)


def test_a_consistent_but_replaced_shard_json_differs_from_the_manifest(tmp_path):
    root = _store(tmp_path)
    path = root / SHARD / "shard.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(with_checksum({**doc, "created_at": "2000-01-01T00:00:00Z"})))
    with pytest.raises(StoreCorruptError, match=r"shard.json differs from the shard recorded"):
        open_store(root).read_shard(1)


def test_vocab_and_tokenizer_files_are_checked_at_open(tmp_path):
    from factories import byte_tokenizer

    from alm.store._fs import locate
    from alm.store.finalize import finalize_store
    from alm.store.writer import StoreLayout, read_plan
    from alm.vocab import vocab_from_tokenizer

    root = _store(tmp_path)
    tokenizer = byte_tokenizer()
    layout = StoreLayout(locate(root), read_plan(locate(root)))
    layout.write_vocab(vocab_from_tokenizer(tokenizer))
    with layout.tokenizer_dir() as folder:
        tokenizer.save_pretrained(folder)
    finalize_store(root)
    manifest = json.loads((root / "alm-store.json").read_text())
    assert document_problem(manifest) is None
    listed = sorted(manifest["files"])
    assert "vocab/teacher_vocab.parquet" in listed and "vocab/tokenizer/tokenizer.json" in listed
    assert open_store(root).vocab_table.num_rows == len(tokenizer)  # intact
    _flip(root / "vocab" / "tokenizer" / "tokenizer.json")
    with pytest.raises(
        StoreCorruptError, match=r"file vocab/tokenizer/tokenizer.json has the right"
    ):
        open_store(root)


def test_a_store_written_before_inventories_is_still_checked_by_its_array_checksums(tmp_path):
    root = _store(tmp_path)
    for path in [root / "alm-store.json", *root.glob("shards/*/shard.json")]:
        doc = json.loads(path.read_text())
        doc.pop("checksum", None)
        doc.pop("files", None)
        for shard in doc.get("shards", []):
            shard.pop("checksum", None)
        path.write_text(json.dumps(doc))
    good = open_store(root).read_shard(1).arrays["logp"]
    chunk = root / SHARD / "arrays" / "logp" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[4] ^= 0x01
    chunk.write_bytes(bytes(data))
    # v2 chunks are Blosc-compressed: the flip is caught by decoding or by the recorded array checksum
    with pytest.raises(
        StoreCorruptError,
        match=r"arrays/logp(/c/0 cannot be decompressed| holds values whose checksum differs)",
    ):
        open_store(root).read_shard(1)
    chunk.unlink()
    with pytest.raises(StoreCorruptError, match=r"arrays/logp/c/0 is missing"):
        open_store(root).read_shard(1)
    assert len(good)
