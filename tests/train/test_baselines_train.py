"""Baselines as `loss.kind` (top-k KD, ULD, MinED+SFT) through stage two: the stored top-k reaches the batch
and the loss, a student equal to the teacher starts at the minimum, each kind trains end to end, and a store
without top-k (or a topk_kd student with another tokenizer) is refused with one message.

Stores come from `run_precompute` with `top_k: 16` on the tiny random teacher (`conftest.py`'s `topk_stores`). The loss
references are the per-position float64 loops of `tests/losses/test_baselines.py`, fed from the store's arrays
read directly (not through the batch builder).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import REPO, TOPK_STORE_K, train_recipe

from alm.config import load_yaml_model
from alm.config.train import LossConfig, TrainRecipe
from alm.errors import AlignmentError, ConfigError
from alm.losses.baselines import mined_vocab_map
from alm.store.reader import open_store
from alm.templates import resolve_family, sequence_from_stored, token_in_loss
from alm.train.batch import StudentExampleBuilder, baseline_positions, collate
from alm.train.log import read_metrics
from alm.train.loop import run_train
from alm.train.step import TrainModule, loss_settings, micro_batch_loss, step_counts
from alm.train.student import load_tokenizer
from alm.vocab import vocab_from_tokenizer
from tests.losses.test_baselines import reference_topk_kl, reference_uld


def _builder(store_path: Path, student_dir: Path, baseline: str) -> StudentExampleBuilder:
    store = open_store(str(store_path))
    tokenizer = load_tokenizer(str(student_dir))
    return StudentExampleBuilder(
        teacher_vocab=store.vocab,
        student_tokenizer=tokenizer,
        student_vocab=vocab_from_tokenizer(tokenizer),
        student_family=resolve_family("auto", tokenizer),
        max_length=64,
        boundary_class_ids=LossConfig().boundary_class_ids(),
        gamma=0.1,
        baseline=baseline,
    )


def _stored(store_path: Path) -> list:
    store = open_store(str(store_path))
    fields = ["token_id", "logp", "boundary_logmass", "topk_id", "topk_logp"]
    return list(store.iter_sequences(fields))


def _batch_loss(model_dir: Path, store_path: Path, baseline: str, kind: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = collate([_builder(store_path, model_dir, baseline)(s) for s in _stored(store_path)])
    counts = step_counts([batch], torch.device("cpu"), lambda t: t)
    cfg = LossConfig(kind=kind, combine="sum")  # pyright: ignore[reportArgumentType]
    boundary = torch.zeros(len(load_tokenizer(str(model_dir))), dtype=torch.bool)
    with torch.no_grad():
        _, parts = micro_batch_loss(
            TrainModule(model),
            batch,
            loss_settings(cfg, None),
            boundary,
            counts,
            len(load_tokenizer(str(model_dir))),
        )
    return float(parts[baseline])


@pytest.mark.parametrize("baseline", ["topk_kd", "uld"])
def test_stored_topk_reaches_the_loss_as_the_reference_computed_from_the_store(
    topk_stores, same_tokenizer_student, baseline
):
    """Same tokenizer: position q's stored top-k pairs with the student's logits at q, for in-loss q + 1."""
    from transformers import AutoModelForCausalLM

    store_path = topk_stores["heldout"]
    model = AutoModelForCausalLM.from_pretrained(same_tokenizer_student, dtype=torch.float32)
    vocab = open_store(str(store_path)).vocab
    total, count = 0.0, 0
    for seq in _stored(store_path):
        assert seq.topk_id is not None and seq.topk_logp is not None
        assert seq.topk_id.shape == (len(seq.token_id), TOPK_STORE_K)
        teacher = sequence_from_stored(seq, vocab)
        in_loss = token_in_loss(teacher.start_byte, teacher.end_byte, teacher.role, seq.loss_spans)
        with torch.no_grad():
            logits = model(torch.as_tensor(seq.token_id, dtype=torch.long)[None]).logits.double()
        mask = torch.zeros(1, len(seq.token_id), dtype=torch.bool)
        mask[0, :-1] = torch.from_numpy(in_loss[1:])  # logits at q predict token q + 1
        ids = torch.from_numpy(seq.topk_id.astype(np.int64))[None]
        logp = torch.from_numpy(seq.topk_logp.astype(np.float64))[None]
        n = int(mask.sum())
        value = (
            reference_topk_kl(logits, ids, logp, mask)
            if baseline == "topk_kd"
            else reference_uld(logits, logp, mask)
        )
        total, count = total + value * n, count + n
    assert count > 20
    got = _batch_loss(same_tokenizer_student, store_path, baseline, baseline)
    assert math.isclose(got, total / count, rel_tol=1e-4), (got, total / count)


@pytest.mark.parametrize(
    ("kind", "baseline"), [("topk_kd", "topk_kd"), ("uld", "uld"), ("mined+sft", "mined")]
)
def test_a_student_equal_to_the_teacher_starts_at_the_minimum(
    topk_stores, teacher_dir, same_tokenizer_student, student_dir, kind, baseline
):
    at_teacher = _batch_loss(teacher_dir, topk_stores["heldout"], baseline, kind)
    other = _batch_loss(
        same_tokenizer_student if baseline == "topk_kd" else student_dir,
        topk_stores["heldout"],
        baseline,
        kind,
    )
    # not exactly 0: the store keeps topk_logp in float16 (docs/store.md)
    assert 0 <= at_teacher < 1e-3 and other > 20 * at_teacher, (at_teacher, other)


def test_mined_pairs_one_to_one_chunks_and_maps_the_stored_topk(topk_stores, student_dir):
    store_path = topk_stores["heldout"]
    builder = _builder(store_path, student_dir, "mined")
    teacher_vocab = open_store(str(store_path)).vocab
    teacher_bytes = list(teacher_vocab.token_bytes)
    student_bytes = list(builder.student_vocab.token_bytes)
    num_pairs = 0
    for seq in _stored(store_path):
        example = builder(seq)
        assert example.distill is not None
        distill = example.distill
        for j, (t, s) in enumerate(zip(distill.teacher_pos, distill.student_pos, strict=True)):
            # a 1:1 chunk: the next teacher token and the next student token have the same bytes
            teacher_next, student_next = int(seq.token_id[t + 1]), int(example.input_ids[s + 1])
            assert teacher_bytes[teacher_next] == student_bytes[student_next]
            row = seq.topk_id[t].astype(np.int64)
            want = mined_vocab_map(teacher_bytes, student_bytes, row)[row]  # the reference map
            specials = teacher_vocab.is_special[row]
            assert distill.topk_id[j][~specials].tolist() == want[~specials].tolist()
            assert distill.topk_logp[j].tolist() == seq.topk_logp[t].tolist()
            num_pairs += 1
    assert num_pairs > 10


def test_topk_kd_positions_refuse_a_student_that_tokenizes_differently(topk_stores, student_dir):
    seq = _stored(topk_stores["heldout"])[0]
    builder = _builder(topk_stores["heldout"], student_dir, "topk_kd")
    with pytest.raises(AlignmentError, match="topk_kd"):
        builder(seq)


def test_uld_pairs_in_loss_positions_by_index_cut_to_the_shorter_side():
    from alm.align.chunks import Chunks

    empty = Chunks(
        *(np.zeros(0, dtype=np.int64) for _ in range(6)), np.zeros(0, bool), np.zeros(0, bool)
    )
    teacher_in_loss = np.array(
        [False, False, True, True, True, True]
    )  # tokens 2..5 -> positions 1..4
    student_in_loss = np.array(
        [False, True, False, True, True]
    )  # tokens 1, 3, 4 -> positions 0, 2, 3
    teacher_pos, student_pos = baseline_positions(
        "uld",
        None,
        None,
        empty,
        teacher_in_loss,
        student_in_loss,  # pyright: ignore[reportArgumentType]
    )
    assert teacher_pos.tolist() == [1, 2, 3] and student_pos.tolist() == [0, 2, 3]


def _train(tmp_path: Path, name: str, **kwargs) -> Path:
    recipe = train_recipe(tmp_path / f"{name}.yaml", output=tmp_path / name, **kwargs)
    run_train(load_yaml_model(TrainRecipe, recipe))
    return tmp_path / name


@pytest.mark.parametrize("kind", ["topk_kd", "uld", "uld+sft", "mined+sft"])
def test_each_baseline_kind_trains_end_to_end_and_falls_on_a_fixed_batch(
    tmp_path, topk_stores, same_tokenizer_student, student_dir, kind
):
    student = same_tokenizer_student if kind == "topk_kd" else student_dir
    out = _train(
        tmp_path,
        "run",
        store=topk_stores["heldout"],
        student={"model": str(student)},
        loss={"kind": kind, "combine": "sum"} if "+" in kind else {"kind": kind},
        optim__steps=4,
    )
    records = [r for r in read_metrics(out) if "loss" in r]
    name = kind.split("+")[0]
    values = [r["loss"] for r in records]
    assert len(values) == 4 and all(math.isfinite(r[name]) for r in records)
    assert values[-1] < values[0], values
    if "+" in kind:  # (1 - w)·SFT + w·baseline with w = 0.1
        first = records[0]
        assert math.isclose(first["loss"], 0.9 * first["sft"] + 0.1 * first[name], rel_tol=1e-5)
    assert (out / "student" / "config.json").is_file()


def test_topk_kd_refuses_a_student_with_another_tokenizer(tmp_path, topk_stores, student_dir):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=topk_stores["heldout"],
        output=tmp_path / "out",
        student={"model": str(student_dir)},
        loss={"kind": "topk_kd"},
    )
    with pytest.raises(ConfigError, match="topk_kd needs the teacher's tokenizer"):
        run_train(load_yaml_model(TrainRecipe, recipe))


@pytest.mark.parametrize("dry_run", [False, True], ids=["train", "dry-run"])
def test_cli_refuses_a_store_without_topk_before_any_model_loads(tmp_path, stores, dry_run):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "out",
        student={"model": "/no/such/model"},  # never loaded: the store is refused first
        loss={"kind": "mined+sft"},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alm.cli",
            "train",
            str(recipe),
            *(["--dry-run"] if dry_run else []),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "topk_id" in result.stderr and "top_k: 64" in result.stderr
    assert "loss.kind=mined+sft" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
