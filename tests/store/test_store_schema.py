"""The store's boundary-class definition, field specs and index schema match the team contract and alm.vocab."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from factories import bpe_tokenizer, byte_tokenizer

from alm import vocab as alm_vocab
from alm.errors import StoreError
from alm.store import schema


def test_boundary_classes_agree_with_alm_vocab():
    assert tuple(alm_vocab.BOUNDARY_CLASS_NAMES) == schema.BOUNDARY_CLASS_NAMES
    assert schema.NUM_BOUNDARY_CLASSES == alm_vocab.NUM_BOUNDARY_CLASSES
    assert schema.SPECIAL_CLASS == alm_vocab.SPECIAL_CLASS
    for tokenizer in (byte_tokenizer(), bpe_tokenizer()):
        vocab = alm_vocab.vocab_from_tokenizer(tokenizer)
        expected = np.array(
            [
                schema.boundary_class_of(b, bool(s))
                for b, s in zip(vocab.token_bytes, vocab.is_special)
            ],
            dtype=np.int8,
        )
        np.testing.assert_array_equal(vocab.boundary_class, expected)


def test_reference_boundary_class_definition():
    assert schema.boundary_class_of(b" the", False) == 0
    assert schema.boundary_class_of(b"\n\n", False) == 1
    assert schema.boundary_class_of(b"\tx", False) == 2
    assert [schema.boundary_class_of(bytes([b]), False) for b in (0x0B, 0x0C, 0x0D)] == [3, 3, 3]
    assert schema.boundary_class_of(b" ", True) == 4  # a special token is only in class 4
    assert schema.boundary_class_of(b"a ", False) == -1
    assert schema.boundary_class_of(b"", False) == -1


def test_index_schema_is_the_team_contract():
    seg = pa.struct(
        [("role", pa.string())]
        + [(n, pa.int64()) for n in ("start_byte", "end_byte", "start_pos", "end_pos")]
    )
    span = pa.struct([("start_byte", pa.int64()), ("end_byte", pa.int64())])
    expected = pa.schema(
        [
            ("seq_id", pa.int64()),
            ("doc_id", pa.string()),
            ("source", pa.string()),
            ("row", pa.int64()),
            ("token_start", pa.int64()),
            ("token_end", pa.int64()),
            ("text", pa.binary()),
            ("segments", pa.list_(seg)),
            ("loss_spans", pa.list_(span)),
            ("truncated", pa.bool_()),
            ("num_tokens", pa.int64()),
            ("num_bytes", pa.int64()),
        ]
    )
    assert schema.INDEX_SCHEMA.equals(expected)


def test_field_specs_dtypes_and_refusals():
    specs = schema.field_specs(schema.ALL_FIELDS, top_k=20, hidden_size=64)
    assert {n: (s.dtype, s.trailing_shape) for n, s in specs.items()} == {
        "token_id": ("int32", ()),
        "logp": ("float32", ()),
        "boundary_logmass": ("float16", (5,)),
        "topk_id": ("int32", (20,)),
        "topk_logp": ("float16", (20,)),
        "hidden": ("uint16", (64,)),
    }
    assert specs["hidden"].encoding == "bfloat16"
    with pytest.raises(StoreError, match="unknown store field"):
        schema.field_specs(["token_id", "logp", "boundary_logmass", "logits"])
    with pytest.raises(StoreError, match="lack the required"):
        schema.field_specs(["token_id", "logp"])
    with pytest.raises(StoreError, match="top_k=0"):
        schema.field_specs([*schema.DEFAULT_FIELDS, "topk_id", "topk_logp"])
    with pytest.raises(StoreError, match="stored together"):
        schema.field_specs([*schema.DEFAULT_FIELDS, "topk_id"], top_k=3)


def test_newer_format_version_is_refused():
    with pytest.raises(StoreError, match="format version 4"):
        schema.check_format({"format": schema.FORMAT_NAME, "format_version": 4}, "x")
    with pytest.raises(StoreError, match="not an alm teacher store"):
        schema.check_format({"format": "other"}, "x")


def test_version_1_is_read_but_never_written():
    v1 = {"format": schema.FORMAT_NAME, "format_version": 1}
    assert schema.check_format(v1, "x") == 1
    with pytest.raises(StoreError, match=f"writes version {schema.FORMAT_VERSION}"):
        schema.check_format(v1, "x", for_writing=True)


def test_crc32c_matches_the_standard_check_value():
    # CRC-32C (Castagnoli) of b"123456789" is 0xE3069283 (RFC 3720 B.4 check value); pieces chain like one buffer
    from alm.store import integrity

    assert integrity.crc32c_hex([b"123456789"]) == "e3069283"
    assert integrity.crc32c_hex([b"1234", memoryview(bytearray(b"56789"))]) == "e3069283"
    assert integrity.file_entry(b"123456789") == {"num_bytes": 9, "crc32c": "e3069283"}
    assert integrity.entry_problem(b"123456788", {"num_bytes": 9, "crc32c": "e3069283"}) == (
        "has the right size but different bytes than were written (crc32c differs)"
    )


@pytest.mark.parametrize("num_bytes", [0, 1, 255, 256, 300, 65_791, 65_792, 5_000_000])
def test_zstd_content_size_is_the_decompressed_length(num_bytes):
    data = np.random.default_rng(num_bytes).integers(0, 8, num_bytes).astype(np.uint8).tobytes()
    frame = pa.Codec("zstd", compression_level=3).compress(data, asbytes=True)
    streamed = pa.CompressedInputStream(pa.BufferReader(frame), "zstd").read_buffer()
    assert schema.zstd_content_size(frame[:18]) == len(streamed) == num_bytes
    assert schema.zstd_content_size(b"not zstd at all") is None


def test_index_file_is_a_zstd_arrow_stream_that_plain_pyarrow_reads(tmp_path):
    rows = [
        {
            "seq_id": i,
            "doc_id": f"d{i}",
            "source": "unit",
            "row": i,
            "token_start": 3 * i,
            "token_end": 3 * i + 3,
            "text": b"abc" * i,
            "segments": [
                {"role": "text", "start_byte": 0, "end_byte": 3 * i, "start_pos": 0, "end_pos": 3}
            ],
            "loss_spans": [{"start_byte": 0, "end_byte": 3 * i}],
            "truncated": False,
            "num_tokens": 3,
            "num_bytes": 3 * i,
        }
        for i in range(50)
    ]
    table = pa.Table.from_pylist(rows, schema=schema.INDEX_SCHEMA)
    path = tmp_path / schema.INDEX_FILE
    path.write_bytes(schema.index_to_bytes(table))
    plain = pa.ipc.open_stream(pa.input_stream(str(path), compression="zstd")).read_all()
    assert plain.equals(table)
    assert schema.index_from_bytes(path.read_bytes()).equals(table)
