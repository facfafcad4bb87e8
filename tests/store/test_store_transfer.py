"""Sharing stores: `alm store push` / `alm store pull` to local and `memory://` targets, and the store card.

Round trips are compared file by file, byte for byte, against the source store; corruption is a flipped byte in
the remote copy; an interrupted pull is a pull that really failed part-way (a corrupt remote file) and is then
resumed after the remote is repaired. Nothing here contacts a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from alm.errors import StoreError
from alm.store import schema
from alm.store.card import CARD_FILE
from alm.store.reader import open_store
from alm.store.transfer import FILES_FILE, pull_store, push_store
from tests.store.store_helpers import make_plan, random_store
from tests.test_cli import run_alm_in_process


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != FILES_FILE
    }


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    random_store(path, make_plan(num_shards=2), num_per_shard=3, seed=7, chunk_tokens=16)
    return path


@pytest.fixture
def memory_url():
    url = f"memory://alm-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _flip_byte(fs, path: str, offset: int = 0) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def _remote_chunk(url: str) -> str:
    """The path of one Zarr chunk file of `logp` in the remote copy (a file the listing covers)."""
    fs, root = fsspec.core.url_to_fs(url)
    chunks = [p for p in fs.find(f"{root}/shards/shard-00001/arrays/logp") if "/c/" in p]
    assert chunks, "the test store must have chunk files"
    return chunks[0]


def test_push_pull_round_trip_is_byte_identical_through_memory(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    pushed = push_store(store, memory_url)
    assert pushed.num_copied == pushed.num_files > 0
    out = tmp_path / "pulled"
    pulled = pull_store(memory_url, out)
    assert pulled.num_copied == pulled.num_files == pushed.num_files
    assert _files(out) == _files(store)
    # and the pulled copy reads as the same store
    a, b = open_store(store), open_store(out)
    for sa, sb in zip(a, b, strict=True):
        assert sa.text == sb.text
        np.testing.assert_array_equal(sa.token_id, sb.token_id)
        np.testing.assert_array_equal(sa.logp, sb.logp)


def test_push_pull_round_trip_through_a_local_folder(store: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    push_store(store, str(remote))
    assert _files(remote) == _files(store)
    out = tmp_path / "pulled"
    pull_store(f"file://{remote}", out)
    assert _files(out) == _files(store)


def test_push_and_pull_again_skip_everything_already_verified(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    push_store(store, memory_url)
    again = push_store(store, memory_url)
    assert again.num_copied == 0 and again.num_skipped == again.num_files
    out = tmp_path / "pulled"
    pull_store(memory_url, out)
    again = pull_store(memory_url, out)
    assert again.num_copied == 0 and again.num_skipped == again.num_files
    assert (out / schema.MANIFEST_FILE).exists()


def test_corrupt_remote_file_is_caught_and_leaves_no_finished_store(
    store: Path, tmp_path: Path, memory_url: str, capsys, monkeypatch
) -> None:
    push_store(store, memory_url)
    chunk = _remote_chunk(memory_url)
    _flip_byte(fsspec.filesystem("memory"), chunk, offset=3)
    out = tmp_path / "pulled"
    result = run_alm_in_process(["store", "pull", memory_url, str(out)], capsys, monkeypatch)
    assert result.returncode == 2
    assert f"{memory_url}/shards/shard-00001/arrays/logp/c/" in result.stderr
    assert chunk.rsplit("/", 1)[-1] in result.stderr
    assert "sha256" in result.stderr and "Traceback" not in result.stderr
    assert not (out / schema.MANIFEST_FILE).exists()
    assert not list(out.rglob("*.tmp-*")), "a failed download leaves no temp file"


def test_corruption_behind_a_consistent_listing_is_caught_by_the_manifest_checksums(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    """Someone rewrote a chunk and its listing entry: the manifest's array checksums still catch it."""
    push_store(store, memory_url)
    fs = fsspec.filesystem("memory")
    chunk = _remote_chunk(memory_url)
    _flip_byte(fs, chunk, offset=len(fs.cat_file(chunk)) - 3)  # in the data, past the Blosc header
    listing_path = f"{memory_url}/{FILES_FILE}"
    listing = json.loads(fs.cat_file(listing_path))

    for entry in listing["files"]:
        if chunk.endswith(entry["path"]):
            entry["sha256"] = hashlib.sha256(fs.cat_file(chunk)).hexdigest()
    fs.pipe_file(listing_path, json.dumps(listing).encode())
    out = tmp_path / "pulled"
    with pytest.raises(StoreError, match=r"shard-00001/arrays/logp: checksum differs"):
        pull_store(memory_url, out)
    assert not (out / schema.MANIFEST_FILE).exists()


def test_interrupted_pull_resumes_copying_only_what_is_missing(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    push_store(store, memory_url)
    fs = fsspec.filesystem("memory")
    chunk = _remote_chunk(memory_url)
    good = fs.cat_file(chunk)
    _flip_byte(fs, chunk)
    out = tmp_path / "pulled"
    with pytest.raises(StoreError, match="corrupt"):
        pull_store(memory_url, out)
    assert not (out / schema.MANIFEST_FILE).exists()
    num_done = sum(1 for p in out.rglob("*") if p.is_file() and p.name != FILES_FILE)
    assert num_done > 0, "the interrupted pull copied some files"
    # a reader refuses the half-pulled folder
    with pytest.raises(StoreError):
        open_store(out)
    fs.pipe_file(chunk, good)  # the remote is repaired (e.g. pushed again)
    resumed = pull_store(memory_url, out)
    assert resumed.num_skipped == num_done
    assert resumed.num_copied == resumed.num_files - num_done
    assert _files(out) == _files(store)


def test_interrupted_push_is_not_a_finished_remote_and_resumes(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    push_store(store, memory_url)
    fs = fsspec.filesystem("memory")
    # as if the push died before its last steps: no manifest, one file missing
    fs.rm(f"{memory_url}/{schema.MANIFEST_FILE}")
    fs.rm(f"{memory_url}/{schema.PLAN_FILE}")
    with pytest.raises(StoreError, match="not a finished teacher store"):
        pull_store(memory_url, tmp_path / "early")
    resumed = push_store(store, memory_url)
    assert resumed.num_copied == 1 and resumed.num_skipped == resumed.num_files - 1
    pull_store(memory_url, tmp_path / "pulled")
    assert _files(tmp_path / "pulled") == _files(store)


def test_push_refuses_an_unfinished_store_and_a_destination_holding_another(
    store: Path, tmp_path: Path, memory_url: str
) -> None:
    unfinished = tmp_path / "unfinished"
    random_store(unfinished, make_plan(num_shards=1), finalize=False)
    with pytest.raises(StoreError, match="alm store finalize"):
        push_store(unfinished, memory_url)
    other = tmp_path / "other"
    random_store(other, make_plan(num_shards=1), seed=3)
    push_store(other, memory_url)
    with pytest.raises(StoreError, match="another finished teacher store"):
        push_store(store, memory_url)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    push_store(store, f"memory://{uuid.uuid4().hex}")
    with pytest.raises(StoreError, match="not an alm teacher store"):
        pull_store(memory_url, foreign)
    assert os.listdir(foreign) == ["notes.txt"]


def test_pull_refuses_a_remote_copied_without_push(store: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="alm store push"):
        pull_store(str(store), tmp_path / "pulled")


def test_finalize_writes_a_store_card_from_the_manifest(store: Path) -> None:
    card = (store / CARD_FILE).read_text()
    manifest = json.loads((store / schema.MANIFEST_FILE).read_text())
    assert manifest["teacher"]["model"] in card
    assert manifest["tokenizer_fingerprint"] in card
    assert manifest["data_spec"]["fingerprint"] in card
    assert manifest["plan_fingerprint"] in card
    for name in manifest["fields"]:
        assert f"`{name}`" in card
    assert f"{manifest['totals']['num_tokens']} teacher tokens" in card
    assert "zarr.open_group" in card and "pa.ipc.open_stream" in card


def test_store_card_snippet_reads_the_store_with_plain_zarr_and_pyarrow(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    card = (store / CARD_FILE).read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(store)
    namespace: dict = {}
    exec(compile(code, "store-card", "exec"), namespace)  # our own documentation snippet
    want = open_store(store).iter_shards()
    last = list(want)[-1]
    np.testing.assert_array_equal(namespace["token_id"], last.arrays["token_id"])
    assert namespace["index"].num_rows == last.index.num_rows
