"""Output-folder rules: foreign folders are never touched, other plans need --overwrite, same plan resumes."""

from __future__ import annotations

import json

import pytest
from store_helpers import make_plan, random_store

from alm.errors import StoreError
from alm.store.reader import open_store
from alm.store.writer import prepare_store


def test_foreign_non_empty_folder_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(
            StoreError, match=r"not an alm teacher store.*--overwrite only replaces alm stores"
        ):
            prepare_store(tmp_path, make_plan(), overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_empty_or_missing_folder_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    prepare_store(tmp_path / "empty", make_plan())
    prepare_store(tmp_path / "new" / "nested", make_plan())
    assert (tmp_path / "new" / "nested" / "alm-store.plan.json").exists()


def test_same_plan_reopens_and_keeps_finished_shards(tmp_path):
    plan = make_plan(num_shards=2)
    random_store(tmp_path, plan)
    layout = prepare_store(tmp_path, make_plan(num_shards=2, backend_versions={"torch": "other"}))
    assert layout.done_shards() == [0, 1] and layout.is_finished()


def test_different_plan_refused_without_overwrite_and_names_the_difference(tmp_path):
    random_store(tmp_path, make_plan(num_shards=2))
    with pytest.raises(
        StoreError, match=r"different settings \(num_shards: 2 -> 3\); pass --overwrite"
    ) as err:
        prepare_store(tmp_path, make_plan(num_shards=3))
    assert str(tmp_path) in str(err.value)
    assert open_store(tmp_path).num_sequences == 8


def test_overwrite_removes_only_store_entries(tmp_path):
    random_store(tmp_path, make_plan(num_shards=2))
    (tmp_path / "NOTES.md").write_text("mine")
    layout = prepare_store(tmp_path, make_plan(num_shards=3), overwrite=True)
    assert layout.done_shards() == [] and not layout.is_finished()
    assert (tmp_path / "NOTES.md").read_text() == "mine"
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").iterdir())


def test_store_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        prepare_store(tmp_path / "f", make_plan())


def test_store_of_another_format_version_needs_overwrite(tmp_path):
    random_store(tmp_path, make_plan(num_shards=1))
    plan_file = tmp_path / "alm-store.plan.json"
    plan_doc = json.loads(plan_file.read_text())
    plan_doc["format_version"] = 0
    plan_file.write_text(json.dumps(plan_doc))
    with pytest.raises(StoreError, match=r"unreadable plan: .*format version 0.*--overwrite"):
        prepare_store(tmp_path, make_plan(num_shards=1))
    layout = prepare_store(tmp_path, make_plan(num_shards=1), overwrite=True)
    assert layout.done_shards() == []


def test_corrupt_json_is_a_store_error(tmp_path):
    random_store(tmp_path, make_plan(num_shards=1))
    (tmp_path / "alm-store.json").write_text("{not json")
    with pytest.raises(StoreError, match="is not valid JSON"):
        open_store(tmp_path)
