"""Write -> read round trips of the teacher store are the identity (local folders and fsspec URLs)."""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pytest
import zarr
from factories import byte_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from store_helpers import TOPK_FIELDS, make_plan, random_sequence, random_store, write_store

import alm
from alm.errors import StoreCorruptError, StoreError
from alm.store import schema
from alm.store._fs import locate
from alm.store.finalize import finalize_store, try_finalize
from alm.store.integrity import with_checksum
from alm.store.reader import open_store
from alm.store.writer import (
    ShardWriter,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    prepare_store,
    shard_file_entries,
)
from alm.vocab import vocab_from_tokenizer

FIELD_SETS = [
    ("token_id", "logp", "boundary_logmass"),
    TOPK_FIELDS,
    ("token_id", "logp", "boundary_logmass", "hidden"),
]


def assert_sequence_equal(stored, expected) -> None:
    assert stored.seq_id == expected["seq_id"]
    assert stored.text == expected["text"]
    assert stored.doc_id == expected["doc_id"] and stored.source == expected["source"]
    assert stored.row == expected["row"] and stored.truncated == expected["truncated"]
    assert stored.segments == expected["segments"]
    np.testing.assert_array_equal(
        stored.loss_spans, np.array(expected["loss_spans"], dtype=np.int64).reshape(-1, 2)
    )
    np.testing.assert_array_equal(stored.token_id, expected["token_id"])
    assert stored.token_id.dtype == np.int32 and stored.logp.dtype == np.float32
    np.testing.assert_array_equal(stored.logp, expected["logp"])  # NaN at q=0 compares equal here
    assert np.isnan(stored.logp[0])
    assert stored.boundary_logmass.dtype == np.float32
    np.testing.assert_array_equal(
        stored.boundary_logmass, expected["boundary_logmass"].astype(np.float32)
    )
    for name in ("topk_id", "topk_logp", "hidden"):
        if name in expected:
            np.testing.assert_array_equal(getattr(stored, name), expected[name])
        else:
            assert getattr(stored, name) is None


@settings(deadline=None, max_examples=12)
@given(
    seed=st.integers(0, 2**31 - 1),
    field_set=st.sampled_from(FIELD_SETS),
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    chunk_tokens=st.sampled_from([7, 64, 4096]),
    stream=st.booleans(),
)
def test_write_read_round_trip_is_identity(
    tmp_path_factory, seed, field_set, counts, chunk_tokens, stream
):
    rng = np.random.default_rng(seed)
    plan = make_plan(
        num_shards=len(counts), fields=field_set, hidden_size=6 if "hidden" in field_set else 0
    )
    shards = [
        [random_sequence(rng, j * 100 + i, plan) for i in range(c)] for j, c in enumerate(counts)
    ]
    # float16 boundary values at the edges of the format: -inf (zero mass), 0, tiny and large magnitudes
    if shards[0]:
        bm = shards[0][0]["boundary_logmass"]
        bm.flat[: min(bm.size, 4)] = np.array([-np.inf, 0.0, -1e-4, -60000.0], dtype=np.float16)[
            : min(bm.size, 4)
        ]
    path = tmp_path_factory.mktemp("store")
    # stream=True flushes every full chunk as it fills; otherwise the shard is written at close
    write_store(
        path, plan, shards, chunk_tokens=chunk_tokens, buffer_bytes=1 if stream else 256 << 20
    )
    store = alm.open_store(path)
    expected = [s for shard in shards for s in shard]
    stored = list(store)
    assert len(stored) == len(expected) == store.num_sequences
    for got, want in zip(stored, expected):
        assert_sequence_equal(got, want)
    assert store.fields == field_set
    assert store.manifest.recorded_totals["num_tokens"] == sum(len(s["token_id"]) for s in expected)


def test_iter_shards_gives_flat_arrays_and_index_ranges(tmp_path):
    plan = make_plan(num_shards=2)
    shards = random_store(tmp_path, plan, num_per_shard=3)
    store = open_store(tmp_path)
    for data, seqs in zip(store.iter_shards(), shards):
        assert data.index.num_rows == len(seqs)
        assert (
            data.arrays["boundary_logmass"].dtype == np.float16
        )  # stored dtype in the columnar view
        starts = data.index.column("token_start").to_numpy()
        ends = data.index.column("token_end").to_numpy()
        for s, e, seq in zip(starts, ends, seqs):
            np.testing.assert_array_equal(data.arrays["token_id"][s:e], seq["token_id"])
            np.testing.assert_array_equal(data.arrays["topk_logp"][s:e], seq["topk_logp"])
    assert store.read_shard(1, ["logp"]).arrays.keys() == {"token_id", "logp"}


def test_memory_url_round_trip():
    url = f"memory://alm-test-{uuid.uuid4().hex[:8]}/store"
    plan = make_plan(num_shards=2)
    shards = random_store(url, plan, num_per_shard=3)
    store = alm.open_store(url)
    for got, want in zip(store, [s for shard in shards for s in shard]):
        assert_sequence_equal(got, want)
    assert store.manifest.recorded_totals["num_sequences"] == store.manifest.num_sequences == 6


def test_memory_url_vocab_tokenizer_files_and_uncommitted_shard(tmp_path):
    url = f"memory://alm-test-{uuid.uuid4().hex[:8]}/store"
    vocab = vocab_from_tokenizer(byte_tokenizer())
    plan = make_plan(num_shards=2, tokenizer_fingerprint=vocab.fingerprint())
    layout = prepare_store(url, plan)
    layout.write_vocab(vocab)
    with layout.tokenizer_dir() as folder:
        byte_tokenizer().save_pretrained(folder)
    rng = np.random.default_rng(0)
    # object stores have no rename: a failed writer leaves files but no shard.json, so the shard is not done
    with (
        pytest.raises(RuntimeError),
        ShardWriter(layout, 0, buffer_bytes=1, chunk_tokens=4) as writer,
    ):
        writer.add(**random_sequence(rng, 0, plan, n=12))
        raise RuntimeError("killed")
    assert not layout.shard_done(0)
    for j in range(2):
        with ShardWriter(layout, j) as writer:
            writer.add(**random_sequence(rng, j, plan))
    assert try_finalize(layout) == f"{url}/alm-store.json"
    store = alm.open_store(url)
    assert store.vocab.fingerprint() == vocab.fingerprint()
    fs = fsspec.filesystem("memory")
    assert fs.exists(store.tokenizer_path.replace("memory://", "") + "/tokenizer_config.json")


def test_unknown_url_scheme_is_a_store_error():
    with pytest.raises(StoreError, match="cannot open store URL"):
        alm.open_store("nosuchfs://bucket/store")


def test_file_url_is_the_local_folder(tmp_path):
    plan = make_plan(num_shards=1)
    random_store(tmp_path, plan, num_per_shard=2)
    assert open_store(f"file://{tmp_path}").num_sequences == 2


def test_bfloat16_bits_round_trip_and_rounding():
    values = np.array([1.0, -2.5, 3.14159, 1e-30, np.inf, -np.inf, 65504.0], dtype=np.float32)
    bits = float32_to_bfloat16_bits(values)
    back = bfloat16_bits_to_float32(bits)
    np.testing.assert_allclose(back[np.isfinite(values)], values[np.isfinite(values)], rtol=2**-8)
    assert np.isposinf(back[4]) and np.isneginf(back[5])
    assert np.isnan(
        bfloat16_bits_to_float32(float32_to_bfloat16_bits(np.array([np.nan], np.float32)))
    )[0]


def test_hidden_float32_input_is_stored_as_bfloat16(tmp_path):
    plan = make_plan(
        num_shards=1, fields=("token_id", "logp", "boundary_logmass", "hidden"), hidden_size=3
    )
    seq = random_sequence(np.random.default_rng(1), 0, plan, n=5)
    hidden = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    seq["hidden"] = hidden
    write_store(tmp_path, plan, [[seq]])
    got = next(iter(open_store(tmp_path)))
    assert got.hidden.dtype == np.uint16
    np.testing.assert_allclose(got.hidden_float32(), hidden, rtol=2**-8)


def test_writer_refuses_bad_sequences(tmp_path):
    plan = make_plan(num_shards=1)
    layout = prepare_store(tmp_path, plan)
    seq = random_sequence(np.random.default_rng(0), 0, plan, n=6)
    with ShardWriter(layout, 0) as writer:
        bad = dict(seq, logp=np.zeros(6, np.float32))
        with pytest.raises(StoreError, match="must be NaN"):
            writer.add(**bad)
        with pytest.raises(StoreError, match="missing"):
            writer.add(**{k: v for k, v in seq.items() if k != "topk_id"})
        with pytest.raises(StoreError, match="shape"):
            writer.add(**dict(seq, boundary_logmass=seq["boundary_logmass"][:, :4]))
        with pytest.raises(StoreError, match="outside the text"):
            writer.add(**dict(seq, loss_spans=[(0, len(seq["text"]) + 1)]))
        writer.add(**seq)
        with pytest.raises(StoreError, match="already added"):
            writer.add(**seq)
    with pytest.raises(StoreError, match=r"outside 0\.\.0"):
        ShardWriter(layout, 1)
    with pytest.raises(StoreError, match="top_k"):
        ShardWriter(layout, 0, top_k=9)


def test_reader_falls_back_to_zarr_for_compressed_or_rechunked_arrays(tmp_path):
    plan = make_plan(num_shards=1)
    shards = random_store(tmp_path, plan, num_per_shard=4)
    group = zarr.open_group(tmp_path / "shards" / "shard-00000" / "arrays", mode="r+")
    for name in ("logp", "boundary_logmass"):
        values = group[name][...]
        del group[name]
        group.create_array(
            name,
            data=values,
            chunks=(5, *values.shape[1:]),
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3),
        )
    # a re-encoded shard is a changed shard until its inventory is rewritten (as a re-encoding tool would)
    with pytest.raises(StoreCorruptError, match=r"shard-00000/arrays"):
        open_store(tmp_path).read_shard(0)
    shard_json = tmp_path / "shards" / "shard-00000" / "shard.json"
    doc = json.loads(shard_json.read_text())
    doc["files"] = shard_file_entries(locate(tmp_path), "shards/shard-00000")
    shard_json.write_text(json.dumps(with_checksum(doc)))
    finalize_store(tmp_path)  # array checksums are over values, so they still match
    for got, want in zip(open_store(tmp_path), shards[0]):
        assert_sequence_equal(got, want)
    # the compressed chunks are checked as they are read too
    chunk = tmp_path / "shards" / "shard-00000" / "arrays" / "logp" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(
        StoreCorruptError, match=r"shard 0, file shards/shard-00000/arrays/logp/c/1"
    ):
        open_store(tmp_path).read_shard(0)


def test_segments_given_as_dicts_in_another_key_order_are_read_by_name(tmp_path):
    plan = make_plan(num_shards=1)
    seq = random_sequence(np.random.default_rng(3), 0, plan, n=6)
    seq["segments"] = [
        {
            "end_pos": 6,
            "start_pos": 1,
            "end_byte": len(seq["text"]),
            "start_byte": 0,
            "role": "text",
        }
    ]
    seq["loss_spans"] = np.array([[0, len(seq["text"])]])
    write_store(tmp_path, plan, [[seq]])
    got = next(iter(open_store(tmp_path)))
    assert got.segments == [
        {
            "role": "text",
            "start_byte": 0,
            "end_byte": len(seq["text"]),
            "start_pos": 1,
            "end_pos": 6,
        }
    ]
    assert got.loss_spans.tolist() == [[0, len(seq["text"])]]


def test_a_segment_that_is_not_a_mapping_is_refused_with_the_keys_it_needs(tmp_path):
    plan = make_plan(num_shards=1)
    seq = random_sequence(np.random.default_rng(3), 0, plan, n=6)
    seq["segments"] = [("text", 0, len(seq["text"]), 0, 6)]
    with pytest.raises(StoreError, match=r"not a mapping with the keys \['role'"):
        write_store(tmp_path, plan, [[seq]])
    assert not (tmp_path / schema.MANIFEST_FILE).exists()
