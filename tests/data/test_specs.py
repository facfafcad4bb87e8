"""alm.data.specs / alm.config.data_spec / alm.data.corpus: every shipped spec loads; sources; splits; errors.

Files are real (JSONL, Parquet, text, a `datasets` folder written with `save_to_disk`) and written into
`tmp_path`; expected documents are spelled out from the file contents.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from alm.data import corpus
from alm.data.specs import (
    DocumentStats,
    data_fingerprint,
    data_spec_fingerprint,
    iter_documents,
    load_data_spec,
)
from alm.errors import ConfigError, DataError
from alm.templates import Segment

REPO = Path(__file__).resolve().parents[2]
SPEC_FILES = sorted((REPO / "data_specs").glob("*.yaml"))


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def texts_of(docs) -> list[bytes]:
    return [d.content_text for d in docs]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during data spec validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------------------------
# Shipped specs


def test_shipped_specs_exist():
    names = {p.stem for p in SPEC_FILES}
    assert {"stdlib_docs", "stdlib_docs_heldout", "tulu3_sft", "openmath2"} <= names
    assert any("jsonl" in p.read_text() for p in SPEC_FILES) and any(
        "parquet" in p.read_text() for p in SPEC_FILES
    )
    example_bytes = sum(
        p.stat().st_size for p in (REPO / "data_specs" / "examples").rglob("*") if p.is_file()
    )
    assert example_bytes < 64_000


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_every_shipped_spec_loads_and_validates_without_network(path, no_network):
    spec = load_data_spec(path)
    assert spec.name and spec.sources
    assert load_data_spec(path.stem).model_dump() == spec.model_dump()


@pytest.mark.parametrize("name", ["example_chat_jsonl", "example_parquet"])
def test_local_example_specs_yield_documents(name):
    spec = load_data_spec(name)
    docs = list(iter_documents(spec, "all"))
    assert len(docs) >= 6
    assert all(d.content_text.strip() for d in docs)


def test_stdlib_train_and_heldout_are_disjoint_by_file():
    train = load_data_spec("stdlib_docs", ["sources.0.max_bytes=60000"])
    heldout = load_data_spec("stdlib_docs_heldout", ["sources.0.max_bytes=30000"])
    train_docs = list(iter_documents(train))
    heldout_docs = list(iter_documents(heldout))
    assert train_docs and heldout_docs
    train_files = {d.doc_id.rsplit(":", 1)[0] for d in train_docs}
    heldout_files = {d.doc_id.rsplit(":", 1)[0] for d in heldout_docs}
    assert not train_files & heldout_files
    for f in heldout_files:
        assert corpus.heldout_fraction_of(f) < 0.05
    assert [s.role for s in train_docs[0].segments] == ["bos", "text", "eos"]
    assert train_docs[0].source == "stdlib"


def test_stdlib_iteration_is_deterministic_and_capped():
    spec = load_data_spec("stdlib_docs", ["sources.0.max_bytes=20000", "sources.0.min_chars=100"])
    first = list(iter_documents(spec))
    second = list(iter_documents(spec))
    assert [d.doc_id for d in first] == [d.doc_id for d in second]
    assert texts_of(first) == texts_of(second)
    total = sum(len(t) for t in texts_of(first))
    assert 20_000 <= total < 20_000 + max(len(t) for t in texts_of(first)) + 1
    assert all(len(t.decode()) >= 100 for t in texts_of(first))


def test_stdlib_corpus_reads_sources_without_importing_them():
    root = corpus.stdlib_root()
    for module in ("antigravity", "this", "__hello__"):
        sys.modules.pop(module, None)
        if (root / f"{module}.py").exists():
            corpus.read_file_blocks(root, f"{module}.py")
        assert module not in sys.modules
    blocks = corpus.extract_blocks(
        '"""Module doc."""\n# first comment\n# continues\nx = 1  # trailing\n\ndef f():\n    """F doc."""\n',
        "m.py",
    )
    assert [(b.kind, b.line, b.text) for b in blocks] == [
        ("docstring", 1, "Module doc."),
        ("comment", 2, "first comment\ncontinues"),
        ("comment", 4, "trailing"),
        ("docstring", 7, "F doc."),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_jsonl_chat_source_with_role_map_and_loss_regions(tmp_path):
    rows = [
        {"conv": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {
            "conv": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A2"},
            ]
        },
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for loss, expected in [
        ("all", [b"Be kind.", b"Q1", b"A1", b"Q2", b"A2"]),
        ("assistant", [b"A1", b"A2"]),
        ("last_assistant", [b"A2"]),
    ]:
        spec = load_data_spec(
            {
                "name": "c",
                "split": "all",
                "sources": [
                    {
                        "type": "jsonl",
                        "path": str(tmp_path / "c.jsonl"),
                        "kind": "chat",
                        "chat": {
                            "messages_field": "conv",
                            "role_field": "from",
                            "content_field": "value",
                            "role_map": {"human": "user", "gpt": "assistant"},
                            "loss": loss,
                        },
                    }
                ],
            }
        )
        docs = list(iter_documents(spec))
        assert [d.doc_id for d in docs] == ["c.jsonl:1", "c.jsonl:2"]
        assert [d.row for d in docs] == [0, 1]
        second = docs[1].segments
        assert [s.role for s in second] == [
            "bos",
            *["header:system", "text", "eot"],
            *["header:user", "text", "eot", "header:assistant", "text", "eot"] * 2,
        ]  # no eos after the final end-of-turn (ALM_SPEC §3)
        assert [s.text for s in second if s.role == "text" and s.in_loss] == expected


def test_prompt_response_fields_make_one_turn(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "generated_solution": "2"}) + "\n")
    spec = load_data_spec(
        {
            "name": "m",
            "split": "all",
            "sources": [
                {
                    "type": "jsonl",
                    "path": str(path),
                    "kind": "chat",
                    "chat": {
                        "prompt_field": "problem",
                        "response_field": "generated_solution",
                        "loss": "last_assistant",
                    },
                }
            ],
        }
    )
    (doc,) = iter_documents(spec)
    assert doc.segments[1:] == (
        Segment("header:user"),
        Segment("text", b"1+1?", False),
        Segment("eot"),
        Segment("header:assistant"),
        Segment("text", b"2", True),
        Segment("eot"),
    )


def test_parquet_file_and_folder_sources(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["b one", "b two"]}), folder / "b.parquet")
    pq.write_table(pa.table({"body": ["a one", "", "a three"]}), folder / "a.parquet")
    spec_path = write_spec(
        tmp_path,
        {
            "name": "p",
            "split": "all",
            "sources": [{"type": "parquet", "path": "pq", "text_field": "body"}],
        },
    )
    stats = DocumentStats()
    docs = list(iter_documents(load_data_spec(spec_path), stats=stats))
    assert texts_of(docs) == [
        b"a one",
        b"a three",
        b"b one",
        b"b two",
    ]  # files sorted, rows in order
    assert [d.row for d in docs] == [0, 2, 3, 4]
    assert stats.num_empty == 1 and stats.num_documents == 4


def test_text_sources_by_file_and_by_line(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "b.txt").write_bytes(b"line one\r\nline two\n\nline four")
    (folder / "a.txt").write_bytes("ünïcode file\n".encode())
    (folder / "skip.md").write_bytes(b"not matched")
    by_file = load_data_spec(
        {"name": "t", "split": "all", "sources": [{"type": "text", "path": str(folder)}]}
    )
    assert texts_of(iter_documents(by_file)) == [
        "ünïcode file\n".encode(),
        b"line one\r\nline two\n\nline four",
    ]
    by_line = load_data_spec(
        {
            "name": "t",
            "split": "all",
            "sources": [{"type": "text", "path": str(folder / "b.txt"), "unit": "line"}],
        }
    )
    stats = DocumentStats()
    docs = list(iter_documents(by_line, stats=stats))
    assert texts_of(docs) == [b"line one", b"line two", b"line four"]
    assert [d.doc_id for d in docs] == ["b.txt:b.txt:1", "b.txt:b.txt:2", "b.txt:b.txt:4"]
    assert stats.num_empty == 1


@pytest.mark.parametrize("as_dict", [False, True])
def test_datasets_load_from_disk_source(tmp_path, as_dict):
    import datasets

    rows = {
        "messages": [
            [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}],
            [{"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
        ]
    }
    ds = datasets.Dataset.from_dict(rows)
    if as_dict:
        datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(
            str(tmp_path / "ds")
        )
    else:
        ds.save_to_disk(str(tmp_path / "ds"))
    source = {"type": "hf_disk", "path": str(tmp_path / "ds"), "kind": "chat"}
    if as_dict:
        source["split"] = "test"
    docs = list(iter_documents(load_data_spec({"name": "d", "split": "all", "sources": [source]})))
    expected = [b"u2a2"] if as_dict else [b"u1a1", b"u2a2"]
    assert texts_of(docs) == expected
    assert [s.text for s in docs[0].segments if s.in_loss] == [expected[0][2:]]


def test_hub_source_offline_is_a_data_error_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_data_spec("tulu3_sft")
    with pytest.raises(DataError, match="hf_disk"):
        next(iter_documents(spec))


def test_heldout_split_partitions_documents_by_id(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(200)))
    base = {
        "name": "x",
        "heldout_fraction": 0.25,
        "sources": [{"type": "jsonl", "path": str(path)}],
    }
    spec = load_data_spec(base)
    train = {d.doc_id for d in iter_documents(spec, "train")}
    heldout = {d.doc_id for d in iter_documents(spec, "heldout")}
    everything = {d.doc_id for d in iter_documents(spec, "all")}
    assert not train & heldout and train | heldout == everything and len(everything) == 200
    assert 25 < len(heldout) < 75
    assert [d.doc_id for d in iter_documents(spec)] == sorted(
        train, key=lambda s: int(s.split(":")[1])
    )


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_invalid_utf8_in_text_file_names_file_and_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good start\nthen \xff bad")
    spec = load_data_spec(
        {
            "name": "b",
            "split": "all",
            "sources": [{"type": "text", "path": str(tmp_path / "bad.txt")}],
        }
    )
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 16"):
        list(iter_documents(spec))


def test_invalid_utf8_and_json_in_jsonl_name_the_place(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    spec = load_data_spec(
        {
            "name": "a",
            "split": "all",
            "sources": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}],
        }
    )
    with pytest.raises(DataError, match=r"a\.jsonl: invalid UTF-8 at byte offset 25"):
        list(iter_documents(spec))
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        list(iter_documents(spec))
    (tmp_path / "a.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match="text_field"):
        list(iter_documents(spec))
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n"
    )
    chat = load_data_spec(
        {
            "name": "a",
            "split": "all",
            "sources": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl"), "kind": "chat"}],
        }
    )
    with pytest.raises(DataError, match="role_map"):
        list(iter_documents(chat))


def test_empty_documents_are_skipped_counted_and_logged(tmp_path, caplog):
    (tmp_path / "e.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["a", "", "  \n", "b"])
    )
    spec = load_data_spec(
        {
            "name": "e",
            "split": "all",
            "sources": [{"type": "jsonl", "path": str(tmp_path / "e.jsonl")}],
        }
    )
    stats = DocumentStats()
    with caplog.at_level(logging.WARNING, logger="alm.data.specs"):
        docs = list(iter_documents(spec, stats=stats))
    assert texts_of(docs) == [b"a", b"b"]
    assert stats.num_empty == 2
    assert "skipped 2 empty" in caplog.text


def test_missing_files_are_one_data_error_listing_all(tmp_path):
    spec = {
        "name": "m",
        "sources": [
            {"type": "jsonl", "path": "nope.jsonl"},
            {"type": "parquet", "path": "missing.parquet"},
            {"type": "stdlib"},
        ],
    }
    path = write_spec(tmp_path, spec)
    with pytest.raises(DataError) as info:
        load_data_spec(path)
    message = str(info.value)
    assert "2 source path(s) not found" in message
    assert "nope.jsonl" in message and "missing.parquet" in message
    unchecked = load_data_spec(path, check_files=False)
    with pytest.raises(DataError, match=r"nope\.jsonl"):
        list(iter_documents(unchecked))


def test_all_spec_problems_are_reported_at_once(tmp_path):
    path = write_spec(
        tmp_path,
        {
            "name": "bad",
            "heldout_fraction": 2,
            "colour": "blue",
            "sources": [
                {
                    "type": "jsonl",
                    "path": "x.jsonl",
                    "kind": "chat",
                    "chat": {"loss": "everything"},
                },
                {"type": "ftp", "path": "y"},
                {"type": "text", "path": "z", "kind": "chat"},
            ],
        },
    )
    with pytest.raises(ConfigError) as info:
        load_data_spec(path)
    message = str(info.value)
    for needle in (
        "heldout_fraction",
        "colour",
        "unknown key",
        "sources.0.jsonl.chat.loss",
        "ftp",
        "sources.2",
    ):
        assert needle in message, needle
    assert str(path) in message


def test_overrides_apply_and_bad_ones_are_config_errors():
    spec = load_data_spec("example_parquet", ["heldout_fraction=0.5", "name=renamed"])
    assert spec.heldout_fraction == 0.5 and spec.name == "renamed"
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_data_spec("example_parquet", ["heldout_fraction=high"])
    with pytest.raises(ConfigError, match="not found"):
        load_data_spec("no_such_spec")
    with pytest.raises(ConfigError, match="heldout_fraction > 0"):
        load_data_spec("example_chat_jsonl", ["split=heldout"])


def test_duplicate_source_names_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    src = {"type": "jsonl", "path": str(tmp_path / "a.jsonl")}
    with pytest.raises(ConfigError, match="distinct"):
        load_data_spec({"name": "d", "sources": [src, src]})


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_is_stable_and_location_independent_but_content_sensitive(tmp_path):
    examples = REPO / "data_specs" / "examples"
    copies = []
    for name in ("one", "two"):
        folder = tmp_path / name
        shutil.copytree(examples, folder / "examples")
        shutil.copy(REPO / "data_specs" / "example_parquet.yaml", folder / "spec.yaml")
        copies.append(folder)
    fp_one = data_spec_fingerprint(load_data_spec(copies[0] / "spec.yaml"))
    assert fp_one == data_spec_fingerprint(load_data_spec(copies[0] / "spec.yaml"))
    assert fp_one == data_spec_fingerprint(load_data_spec(copies[1] / "spec.yaml"))
    assert len(fp_one) == 64
    (copies[1] / "examples" / "texts" / "poem.txt").write_text("changed\n")
    assert data_spec_fingerprint(load_data_spec(copies[1] / "spec.yaml")) != fp_one
    changed_spec = load_data_spec(copies[0] / "spec.yaml", ["heldout_fraction=0.3"])
    assert data_spec_fingerprint(changed_spec) != fp_one
    spec = load_data_spec(copies[0] / "spec.yaml")
    assert data_fingerprint(spec, "train", 10) != data_fingerprint(spec, "heldout", 10)
    assert data_fingerprint(spec, "train", 10) != data_fingerprint(spec, "train", 11)
    assert data_fingerprint(spec) == data_fingerprint(spec, "train", None)


def test_hub_spec_fingerprint_needs_no_network(no_network):
    spec = load_data_spec("openmath2")
    assert data_spec_fingerprint(spec) == data_spec_fingerprint(load_data_spec("openmath2"))
