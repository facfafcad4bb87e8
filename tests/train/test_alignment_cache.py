"""Alignment caches (`alm align`, `alm train` reusing them, `alm verify`, `alm inspect --student`).

Real stores written by `alm precompute` from a tiny real teacher, real student tokenizers (a larger BPE, the byte
tokenizer), real Arrow files. The reference for "same targets" is the on-the-fly path, `StudentExampleBuilder`,
which the rest of the suite pins against the spec; the cache must reproduce it bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import train_recipe

from alm.errors import StoreCorruptError, StoreError, StoreMismatchError
from alm.store import alignments as cache_format
from alm.store.reader import open_store
from alm.train.alignments import (
    CachedExamples,
    builder_for,
    cache_key_of,
    chunk_statistics,
    inspect_student,
    record_from_example,
    write_alignments,
)
from alm.train.batch import StudentExampleBuilder, collate

MAX_LENGTH = (
    40  # below the store's 48 teacher tokens: the student side is truncated for some sequences
)


def _copy_store(src: Path, tmp_path: Path, name: str = "store") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _student(name: str, student_dir: Path) -> str:
    return "bytes" if name == "bytes" else str(student_dir)


def _assert_examples_identical(cached, fresh) -> None:
    for name in ("input_ids", "sft_mask"):
        a, b = getattr(cached, name), getattr(fresh, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for name in fresh.targets.__dataclass_fields__:
        a, b = getattr(cached.targets, name), getattr(fresh.targets, name)
        assert a.dtype == b.dtype, name
        assert a.tobytes() == b.tobytes(), name  # bit for bit (float32 group log-probs included)
    if fresh.hidden_teacher is None:
        assert cached.hidden_teacher is None
    else:
        assert cached.hidden_teacher.tobytes() == fresh.hidden_teacher.tobytes()


@pytest.mark.parametrize("student_name", ["bpe", "bytes"])
def test_cached_examples_equal_on_the_fly_examples_bit_for_bit(
    stores, student_dir, tmp_path, student_name
):
    store_path = _copy_store(stores["train"], tmp_path)
    store = open_store(store_path)
    builder = builder_for(store, student=_student(student_name, student_dir), max_length=MAX_LENGTH)
    summary = write_alignments(str(store_path), builder)
    assert summary.num_shards_written == len(store.shard_indices) > 1
    assert (store_path / "alignments" / cache_key_of(builder) / "alm-alignments.json").is_file()

    hidden_builder = StudentExampleBuilder(
        teacher_vocab=builder.teacher_vocab,
        student_tokenizer=builder.student_tokenizer,
        student_vocab=builder.student_vocab,
        student_family=builder.student_family,
        max_length=builder.max_length,
        boundary_class_ids=builder.boundary_class_ids,
        gamma=builder.gamma,
        debias=builder.debias,
        with_hidden=True,
    )
    cached = CachedExamples(str(store_path), cache_key_of(builder), with_hidden=True)
    fresh_examples, cached_examples = [], []
    num_groups = 0
    for j in store.shard_indices:
        for row, seq in enumerate(store.read_shard(j).sequences()):
            fresh = hidden_builder(seq)
            from_cache = cached.example(j, row, seq)
            _assert_examples_identical(from_cache, fresh)
            fresh_examples.append(fresh)
            cached_examples.append(from_cache)
            num_groups += fresh.targets.num_groups
    assert num_groups > 0
    a, b = collate(cached_examples[:4]), collate(fresh_examples[:4])
    for name in ("input_ids", "attention_mask", "sft_mask", "num_sft_tokens", "hidden_teacher"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in a.targets.__dataclass_fields__:
        x, y = getattr(a.targets, name), getattr(b.targets, name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name


def test_cache_records_what_the_builder_aligned(stores, student_dir, tmp_path):
    """The cached chunks are the builder's greedy chunks; the group boundary terms are the stored masses."""
    store_path = _copy_store(stores["plain"], tmp_path)
    store = open_store(store_path)
    builder = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    write_alignments(str(store_path), builder)
    cache = cache_format.open_cache(store, cache_key_of(builder))
    assert cache is not None
    for j in store.shard_indices:
        shard = cache.read_shard(store, j)
        for row, seq in enumerate(store.read_shard(j).sequences()):
            record = shard.record(row)
            _, chunks = builder.build(seq)
            assert record.seq_id == seq.seq_id
            assert np.array_equal(record.chunk_teacher_start, chunks.teacher_start)
            assert np.array_equal(record.chunk_student_end, chunks.student_end)
            assert np.array_equal(record.chunk_in_loss, chunks.in_loss)
            # boundary term: log of the stored default-set mass (space, newline, tab, special) at the group end
            probs = np.exp(seq.boundary_logmass[:, [0, 1, 2, 4]].astype(np.float64)).sum(axis=1)
            expected = np.log(np.minimum(probs, 1.0))[record.group_teacher_end - 1]
            np.testing.assert_allclose(record.group_boundary_logmass, expected, rtol=1e-5)
            assert (np.exp(record.group_boundary_logmass) > builder.gamma).all()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_the_cache_equals_training_on_the_fly(stores, student_dir, tmp_path, caplog):
    from alm.config import load_yaml_model
    from alm.config.train import TrainRecipe
    from alm.train.loop import run_train

    store_path = _copy_store(stores["train"], tmp_path)
    runs = {}
    for policy in ("off", "required"):
        recipe = train_recipe(
            tmp_path / f"{policy}.yaml",
            store=store_path,
            output=tmp_path / f"run-{policy}",
            student={"model": str(student_dir), "max_length": MAX_LENGTH},
            loss__kind="alm+sft",
            loss__hidden=0.5,
            optim__steps=3,
            stores=[{"path": str(store_path), "alignments": policy}],
        )
        cfg = load_yaml_model(TrainRecipe, recipe, [])
        if policy == "required":
            with pytest.raises(StoreMismatchError, match="alignments is `required`"):
                run_train(cfg)
            assert not (tmp_path / f"run-{policy}").exists()  # refused before anything was written
            store = open_store(store_path)
            write_alignments(str(store_path), builder_for(store, recipe=str(recipe)))
        with caplog.at_level(logging.INFO, logger="alm.train.alignments"):
            runs[policy] = run_train(cfg)
    assert any("using alignment cache" in r.getMessage() for r in caplog.records)
    off, cached = _metrics(tmp_path / "run-off"), _metrics(tmp_path / "run-required")
    steps_off = [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in off]
    steps_cached = [
        {k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in cached
    ]
    assert [r.get("loss") for r in steps_off] == [r.get("loss") for r in steps_cached]
    assert steps_off == steps_cached
    from safetensors.torch import load_file

    a = load_file(str(runs["off"] / "model.safetensors"))
    b = load_file(str(runs["required"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stale_cache_is_refused_or_ignored(stores, student_dir, tmp_path, caplog):
    from alm.config.train import StoreRef
    from alm.train.alignments import find_cache

    store_path = _copy_store(stores["plain"], tmp_path)
    store = open_store(store_path)
    built = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    write_alignments(str(store_path), built)
    same = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    assert find_cache(StoreRef(path=str(store_path)), same, with_hidden=False) is not None

    other_length = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH + 1)
    other_gamma = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    other_gamma.gamma = 0.2
    other_tokenizer = builder_for(store, student="bytes", max_length=MAX_LENGTH)
    # a cache built while the student rendered chat in its family is stale once it renders with its template
    other_family = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    other_family.student_family = "template:chatml"
    for builder, why in (
        (other_length, "student_max_length"),
        (other_gamma, "gamma"),
        (other_family, "student_family"),
        (other_tokenizer, "no finished cache"),
    ):
        with pytest.raises(StoreMismatchError, match=why):
            find_cache(
                StoreRef(path=str(store_path), alignments="required"), builder, with_hidden=False
            )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="alm.train.alignments"):
            assert find_cache(StoreRef(path=str(store_path)), builder, with_hidden=False) is None
        assert any(
            "aligning on the fly" in r.getMessage() and why in r.getMessage()
            for r in caplog.records
        )
    assert (
        find_cache(StoreRef(path=str(store_path), alignments="off"), same, with_hidden=False)
        is None
    )

    # `alm align` with other settings for the same tokenizer: refused, then replaced with --overwrite
    with pytest.raises(StoreMismatchError, match="other settings"):
        write_alignments(str(store_path), other_length)
    write_alignments(str(store_path), other_length, overwrite=True)
    assert find_cache(StoreRef(path=str(store_path)), other_length, with_hidden=False) is not None
    assert find_cache(StoreRef(path=str(store_path)), same, with_hidden=False) is None


def test_cache_of_a_recomputed_store_shard_is_stale(stores, student_dir, tmp_path):
    """A cache records each store shard's checksum: a store rebuilt with other content is not trusted."""
    store_path = _copy_store(stores["plain"], tmp_path)
    store = open_store(store_path)
    builder = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    write_alignments(str(store_path), builder)
    key = cache_key_of(builder)
    doc_path = store_path / "alignments" / key / "shards" / "shard-00000.json"
    doc = json.loads(doc_path.read_text())
    doc["store_shard_checksum"] = "0" * 64
    from alm.store.integrity import with_checksum

    doc_path.write_text(json.dumps(with_checksum(doc)))
    cache = cache_format.open_cache(store, key)
    assert cache is not None
    with pytest.raises(StoreCorruptError, match=r"shard-00000\.json"):
        cache.read_shard(store, 0)  # the manifest lists the old JSON's checksum


def test_align_resumes_after_an_interruption(stores, student_dir, tmp_path):
    store_path = _copy_store(stores["plain"], tmp_path)
    store = open_store(store_path)
    builder = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    write_alignments(str(store_path), builder)
    root = store_path / "alignments" / cache_key_of(builder)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.arrow")}
    assert len(before) == len(store.shard_indices) > 1
    # What a run killed while writing shard 1 leaves: no manifest, shard 0 committed, shard 1 half written.
    (root / "alm-alignments.json").unlink()
    (root / "shards" / "shard-00001.json").unlink()
    (root / "shards" / "shard-00001.arrow").write_bytes(b"partial")
    (root / "shards" / "shard-00002.arrow.tmp-0123abcd").write_bytes(b"temp")
    kept_inode = (root / "shards" / "shard-00000.arrow").stat().st_ino
    assert cache_format.open_cache(store, cache_key_of(builder)) is None  # unfinished: never read

    summary = write_alignments(str(store_path), builder)
    assert summary.num_shards_kept == len(store.shard_indices) - 1
    assert summary.num_shards_written == 1
    assert (root / "shards" / "shard-00000.arrow").stat().st_ino == kept_inode
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*.arrow")}
    assert after == before  # identical to the uninterrupted run


def test_verify_catches_a_corrupted_cache_file(stores, student_dir, tmp_path):
    from alm.verify import run_verify

    store_path = _copy_store(stores["plain"], tmp_path)
    store = open_store(store_path)
    builder = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    write_alignments(str(store_path), builder)
    assert "alignment cache alignments/" in run_verify(store_path)
    arrow = store_path / "alignments" / cache_key_of(builder) / "shards" / "shard-00001.arrow"
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    with pytest.raises(
        StoreCorruptError, match=r"shard-00001\.arrow has the right size but different"
    ):
        run_verify(store_path)
    cached = CachedExamples(str(store_path), cache_key_of(builder), with_hidden=False)
    seq = next(store.read_shard(1).sequences())
    with pytest.raises(StoreCorruptError, match=r"shard-00001\.arrow"):
        cached.example(1, 0, seq)


def test_chunk_statistics_match_a_direct_count(stores, student_dir):
    store = open_store(stores["plain"])
    builder = builder_for(store, student=str(student_dir), max_length=MAX_LENGTH)
    stats, source = inspect_student(str(stores["plain"]), student=str(student_dir))
    assert "aligned now" in source
    builder = builder_for(store, student=str(student_dir))  # what inspect uses: default max_length
    chunk_lengths, groups, covered = [], 0, 0
    for seq in store:
        example, chunks = builder.build(seq)
        in_loss = chunks.select(chunks.in_loss)
        chunk_lengths += [int(e - s) for s, e in zip(in_loss.start_byte, in_loss.end_byte)]
        groups += example.targets.num_groups
        covered += int(sum(in_loss.end_byte - in_loss.start_byte))
    assert stats["num_chunks_in_loss"] == len(chunk_lengths)
    assert stats["num_groups"] == groups
    assert stats["bytes_covered"] == covered / store.manifest.num_text_bytes
    histogram = {(lo, hi): n for lo, hi, n in stats["chunk_bytes_histogram"]}
    assert sum(histogram.values()) == len(chunk_lengths)
    assert histogram[(1, 1)] == sum(1 for n in chunk_lengths if n == 1)
    assert histogram[(5, 8)] == sum(1 for n in chunk_lengths if 5 <= n <= 8)
    assert stats["chunks_per_sequence"]["max"] == max(
        int(builder.build(seq)[1].in_loss.sum()) for seq in store
    )
    records = (
        record_from_example(seq, *builder.build(seq), builder.boundary_class_ids) for seq in store
    )
    assert chunk_statistics(records, stats["num_text_bytes"]) == {
        k: v for k, v in stats.items() if k != "settings"
    }


def test_unfinished_store_is_refused(stores, student_dir, tmp_path):
    store_path = _copy_store(stores["plain"], tmp_path)
    (store_path / "alm-store.json").unlink()
    with pytest.raises(StoreError, match="unfinished"):
        builder = builder_for(
            open_store(store_path, allow_unfinished=True), student=str(student_dir)
        )
        write_alignments(str(store_path), builder)


# --------------------------------------------------------------------------------------------------------------
# The command line, through the installed entry point (exit code 2 for every user error)


@dataclass
class _Result:
    returncode: int
    stdout: str
    stderr: str


def _alm_entry_point(*args: str) -> _Result:
    """The installed `alm` in a subprocess, exactly as a user runs it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "alm"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return _Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def alm(capsys, monkeypatch):
    """`alm ARGS` through `alm.cli.main` in this process (the same code as the entry point; no start-up cost)."""
    import sys

    from alm.cli import main

    def run(*args: str) -> _Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["alm", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out = capsys.readouterr()
        return _Result(code, out.out, out.err)

    return run


def test_align_cli_user_errors_exit_2(stores, student_dir, tmp_path, alm):
    store_path = _copy_store(stores["plain"], tmp_path)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=store_path,
        output=tmp_path / "run",
        student={"model": str(student_dir)},
    )
    cases = [
        ((str(store_path),), "exactly one of --student"),
        ((str(store_path), "--student", "bytes", "--recipe", str(recipe)), "exactly one of"),
        ((str(store_path), "--recipe", str(recipe), "--max-length", "9"), "--max-length goes with"),
        ((str(store_path), "--student", str(tmp_path / "no-such-tokenizer")), "no such folder"),
        ((str(store_path), "--student", "bytes", "--max-length", "1"), "at least 2"),
        ((str(tmp_path / "no-store"), "--student", "bytes"), "no teacher store"),
    ]
    entry_point = _alm_entry_point("align", *cases[0][0])
    assert entry_point.returncode == 2 and cases[0][1] in entry_point.stderr
    for args, message in cases:
        result = alm("align", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (store_path / "alignments").exists()  # nothing half-written


def test_align_inspect_verify_through_the_cli(stores, student_dir, tmp_path, alm):
    store_path = _copy_store(stores["plain"], tmp_path)
    first = alm("align", str(store_path), "--student", str(student_dir), "--max-length", "40")
    assert first.returncode == 0, first.stderr
    assert "alignment cache" in first.stdout and "max_length 40" in first.stdout
    (cache_root,) = (store_path / "alignments").iterdir()
    manifest = (cache_root / "alm-alignments.json").read_bytes()

    other = alm("align", str(store_path), "--student", str(student_dir), "--max-length", "41")
    assert other.returncode == 2 and "other settings" in other.stderr
    assert (cache_root / "alm-alignments.json").read_bytes() == manifest

    again = alm("align", str(store_path), "--student", str(student_dir), "--max-length", "40")
    assert again.returncode == 0 and "0 shard(s) written" in again.stdout

    inspected = alm("inspect", str(store_path), "--student", "bytes")
    assert inspected.returncode == 0, inspected.stderr
    assert "chunk length histogram" in inspected.stdout and "aligned now" in inspected.stdout
    both = alm("inspect", str(store_path), "--student", "bytes", "--compare", str(store_path))
    assert both.returncode == 2

    verified = alm("verify", str(store_path))
    assert verified.returncode == 0, verified.stderr
    assert f"alignment cache alignments/{cache_root.name}" in verified.stdout
    (cache_root / "shards" / "shard-00000.arrow").unlink()
    broken = alm("verify", str(store_path))
    assert broken.returncode == 2 and "shard-00000.arrow is missing" in broken.stderr


def test_precompute_writes_alignment_caches_for_students(teacher_dir, student_dir, tmp_path, alm):
    from train_helpers import DATA_SPEC, write_yaml

    recipe = write_yaml(
        tmp_path / "pre.yaml",
        {
            "teacher": {
                "model": str(teacher_dir),
                "backend": "hf",
                "device": "cpu",
                "dtype": "float32",
            },
            "data": {"spec": str(DATA_SPEC), "split": "train", "limit": 6},
            "output": str(tmp_path / "store"),
            "max_length": 48,
            "token_budget": 512,
            "shard_size": 4,
        },
    )
    result = alm("precompute", str(recipe), "--students", "bytes", "--students", str(student_dir))
    assert result.returncode == 0, result.stderr
    store = open_store(tmp_path / "store")
    keys = cache_format.list_cache_keys(store)
    assert len(keys) == 2
    for key in keys:
        cache = cache_format.open_cache(store, key)
        assert (
            cache is not None and cache.manifest["totals"]["num_sequences"] == store.num_sequences
        )


def test_required_cache_is_checked_before_any_model_loads_and_dry_run_reports_it(
    stores, student_dir, tmp_path
):
    from alm.config import load_yaml_model
    from alm.config.train import TrainRecipe
    from alm.train.command import run_train_cli
    from alm.train.loop import run_train

    store_path = _copy_store(stores["plain"], tmp_path)
    tokenizer_only = tmp_path / "tokenizer-only"  # no weights: loading the model would fail
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(student_dir / name, tokenizer_only / name)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=store_path,
        output=tmp_path / "run",
        student={"model": str(tokenizer_only), "max_length": MAX_LENGTH},
        stores=[{"path": str(store_path), "alignments": "required"}],
    )
    cfg = load_yaml_model(TrainRecipe, recipe, [])
    with pytest.raises(StoreMismatchError, match="no finished cache"):
        run_train(cfg)
    write_alignments(str(store_path), builder_for(open_store(store_path), recipe=str(recipe)))
    printed = run_train_cli(recipe, [], dry_run=True, resume=False, overwrite=False)
    assert f"# store {store_path}: alignment cache used (required)" in printed
