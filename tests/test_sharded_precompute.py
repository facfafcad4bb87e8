"""Many workers: `alm precompute --shard i/N` in parallel processes, `alm store finalize`, and the vLLM store path.

- N real `alm precompute` processes at once on CPU (a tiny random Llama and a trained byte-level BPE) write the
  same store, array for array, as one worker;
- `alm store finalize` refuses a missing, a duplicated and a mismatched shard with exit code 2 and a message that
  names the problem;
- a store written through the vLLM backend (`alm.teacher.vllm.VLLMTeacher`, its conversions, and the precompute
  path) from realistic vLLM outputs equals the HF backend's store: vLLM itself is replaced by a stand-in engine that
  computes the same tiny model's logits, returns them in vLLM 0.33's `RequestOutput` shapes and enforces 0.33.0's
  argument checks (`tests/teacher/vllm_standin.py`, shapes from `tests/teacher/test_vllm_convert.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from alm.store import schema
from alm.store.inspect import compare_stores_stats
from alm.store.reader import open_store

REPO = Path(__file__).resolve().parent.parent
DATA_SPEC = REPO / "data_specs" / "stdlib_docs.yaml"
NUM_DOCS = 10
SHARD_SIZE = 2  # 5 shards


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with a trained byte-level BPE tokenizer: a real local teacher folder."""
    from factories import bpe_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = bpe_tokenizer()
    tiny_llama(len(tokenizer), seed=7).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(path: Path, teacher: Path, output: Path, **changes) -> Path:
    recipe = {
        "teacher": {"model": str(teacher), "backend": "hf", "device": "cpu", "dtype": "float32"},
        "data": {"spec": str(DATA_SPEC), "split": "train", "limit": NUM_DOCS},
        "output": str(output),
        "max_length": 40,
        "token_budget": 256,
        "row_chunk": 64,
        "top_k": 4,
        "shard_size": SHARD_SIZE,
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def alm_cli(*args: str, **popen) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "ALM_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "alm.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run_alm(*args: str) -> subprocess.CompletedProcess:
    proc = alm_cli(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_same_store(path_a: Path, path_b: Path) -> None:
    """Equal plans, shards, index tables and every per-token array (NaN where NaN)."""
    a, b = open_store(str(path_a)), open_store(str(path_b))
    assert a.manifest.plan_fingerprint == b.manifest.plan_fingerprint
    assert a.shard_indices == b.shard_indices
    for shard_a, shard_b in zip(a.iter_shards(), b.iter_shards(), strict=True):
        assert shard_a.index.column_names == shard_b.index.column_names
        for column in shard_a.index.column_names:
            assert shard_a.index.column(column).equals(shard_b.index.column(column)), (
                shard_a.shard_index,
                column,
            )
        assert shard_a.arrays.keys() == shard_b.arrays.keys()
        for name, array in shard_a.arrays.items():
            np.testing.assert_array_equal(array, shard_b.arrays[name], err_msg=name)
    for record_a, record_b in zip(a.manifest.shards, b.manifest.shards, strict=True):
        assert record_a.arrays == record_b.arrays


@pytest.fixture(scope="module")
def stores(teacher_dir, tmp_path_factory):
    """One store written by a single in-process worker, one by 3 worker processes running at once."""
    from alm.precompute import run_precompute

    root = tmp_path_factory.mktemp("stores")
    single = root / "single"
    run_precompute(write_recipe(root / "single.yaml", teacher_dir, single), shard="0/1")
    sharded = root / "sharded"
    recipe = write_recipe(root / "sharded.yaml", teacher_dir, sharded)
    workers = [alm_cli("precompute", str(recipe), "--shard", f"{i}/3") for i in range(3)]
    for worker in workers:
        _out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    return types.SimpleNamespace(single=single, sharded=sharded, sharded_recipe=recipe)


def test_parallel_workers_write_the_same_store_as_one_worker(stores):
    assert (stores.sharded / schema.MANIFEST_FILE).exists()  # the last worker finalized
    manifest = json.loads((stores.sharded / schema.MANIFEST_FILE).read_text())
    assert len(manifest["shards"]) == NUM_DOCS // SHARD_SIZE
    assert_same_store(stores.single, stores.sharded)


@pytest.mark.slow
def test_a_rerun_worker_skips_its_finished_shards(stores):
    shard_files = sorted((stores.sharded / schema.SHARDS_DIR).rglob(schema.SHARD_FILE))
    before = [p.stat().st_mtime_ns for p in shard_files]
    result = run_alm("precompute", str(stores.sharded_recipe), "--shard", "1/3")
    assert result.returncode == 0, result.stderr
    assert "already written" in result.stdout
    assert [p.stat().st_mtime_ns for p in shard_files] == before


@pytest.fixture()
def unfinished(stores, tmp_path) -> Path:
    """A copy of the sharded store without its manifest."""
    copy = tmp_path / "store"
    shutil.copytree(stores.sharded, copy)
    (copy / schema.MANIFEST_FILE).unlink()
    return copy


def test_finalize_of_a_complete_store_writes_the_manifest(unfinished):
    result = run_alm("store", "finalize", str(unfinished))
    assert result.returncode == 0, result.stderr
    assert (unfinished / schema.MANIFEST_FILE).exists()


def test_finalize_refuses_a_missing_shard(unfinished):
    shutil.rmtree(unfinished / schema.SHARDS_DIR / "shard-00003")
    result = run_alm("store", "finalize", str(unfinished))
    assert result.returncode == 2
    assert "missing shard(s) [3] of 5" in result.stderr
    assert "--shard" in result.stderr  # says how to fix it
    assert not (unfinished / schema.MANIFEST_FILE).exists()


def test_finalize_refuses_a_duplicated_shard(unfinished):
    shards = unfinished / schema.SHARDS_DIR
    shutil.copytree(shards / "shard-00001", shards / "shard-00001-copy")
    result = run_alm("store", "finalize", str(unfinished))
    assert result.returncode == 2
    assert "shard 1 is present more than once" in result.stderr
    assert not (unfinished / schema.MANIFEST_FILE).exists()


def test_finalize_refuses_a_shard_from_another_recipe(unfinished, teacher_dir, tmp_path):
    from alm.precompute import run_precompute

    other = tmp_path / "other"
    run_precompute(
        write_recipe(tmp_path / "other.yaml", teacher_dir, other, max_length=24, data__limit=2),
        shard="0/1",
    )
    shards = unfinished / schema.SHARDS_DIR
    shutil.rmtree(shards / "shard-00000")
    shutil.copytree(other / schema.SHARDS_DIR / "shard-00000", shards / "shard-00000")
    result = run_alm("store", "finalize", str(unfinished))
    assert result.returncode == 2
    assert "shard-00000: num_shards is 1, the plan says 5" in result.stderr
    assert "plan" in result.stderr
    assert not (unfinished / schema.MANIFEST_FILE).exists()


# --------------------------------------------------------------------------------------------------------------
# the vLLM backend's store, with a stand-in engine
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["token_ids", "topk_lower"])
def test_a_store_written_through_the_vllm_path_equals_the_hf_store(
    stores, teacher_dir, tmp_path, monkeypatch, method
):
    from teacher.vllm_standin import standin_vllm_module

    import alm.teacher.vllm as vllm_backend
    from alm.precompute import run_precompute

    engine_log: list = []
    module = standin_vllm_module(engine_log)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", module.inputs)
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: module)
    single = stores.single
    store = tmp_path / "vllm"
    run_precompute(
        write_recipe(
            tmp_path / "vllm.yaml",
            teacher_dir,
            store,
            teacher__backend="vllm",
            teacher__device="auto",
            teacher__vllm={"boundary_method": method, "num_logprobs": 6},
        ),
        shard="0/1",
    )
    engine_args, *calls = (
        engine_log  # one engine, then the generate calls (checked by the stand-in)
    )
    assert calls and all(name == "generate" and len(p) == len(ps) for name, p, ps in calls)
    assert engine_args["logprobs_mode"] == "raw_logprobs"
    assert engine_args["enable_prefix_caching"] is False
    vllm_store = open_store(str(store))
    assert vllm_store.manifest.backend == "vllm"
    assert vllm_store.manifest.boundary_method == method
    assert vllm_store.manifest.boundary_top_k == (6 if method == "topk_lower" else 0)

    stats = compare_stores_stats(str(single), str(store))  # raises if token ids or sequences differ
    assert stats["logp"]["max"] < 1e-5
    hf_store = open_store(str(single))
    for shard_hf, shard_vllm in zip(hf_store.iter_shards(), vllm_store.iter_shards(), strict=True):
        assert shard_hf.index.equals(shard_vllm.index)
        np.testing.assert_array_equal(shard_hf.arrays["topk_id"], shard_vllm.arrays["topk_id"])
        np.testing.assert_allclose(
            shard_hf.arrays["topk_logp"].astype(np.float32),
            shard_vllm.arrays["topk_logp"].astype(np.float32),
            rtol=1e-3,
        )
    if method == "token_ids":  # exact: equal up to float16 rounding of nearly equal values
        assert stats["merge_decisions_differ"] == 0
        for name, diff in stats["boundary_logmass"].items():
            assert diff["num_finite_mismatch"] == 0, name
            assert diff["max"] <= 1e-2, name
    else:  # the lower bound never exceeds the exact mass
        for shard_hf, shard_vllm in zip(
            hf_store.iter_shards(["boundary_logmass"]),
            vllm_store.iter_shards(["boundary_logmass"]),
            strict=True,
        ):
            exact = shard_hf.arrays["boundary_logmass"].astype(np.float32)
            lower = shard_vllm.arrays["boundary_logmass"].astype(np.float32)
            assert np.all(lower <= exact + 1e-2)
