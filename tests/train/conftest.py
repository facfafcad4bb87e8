"""Fixtures for the stage-two tests: a tiny local teacher, teacher stores written by `run_precompute`, students.

Everything is built in-process and offline: a random two-layer Llama with a byte-level BPE trained on stdlib text
is the teacher; `alm.precompute.run_precompute` writes a training store (with hidden states), one without hidden
states, and a held-out store of four sequences (one micro-batch: a fixed batch); `topk_stores` add the top-16 for
the baselines, whose same-tokenizer student is `same_tokenizer_student`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import TOPK_STORE_K, precompute


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    from factories import bpe_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = bpe_tokenizer(512)
    tiny_llama(len(tokenizer), seed=7, hidden=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory) -> Path:
    """A different student: its own tokenizer (a larger BPE) and random weights of another width."""
    from factories import bpe_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("student")
    tokenizer = bpe_tokenizer(700)
    tiny_llama(len(tokenizer), seed=11, hidden=48).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def stores(teacher_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    return {
        "train": precompute(root, teacher_dir, "train", split="train", limit=12, hidden=True),
        "plain": precompute(root, teacher_dir, "plain", split="train", limit=8, hidden=False),
        "heldout": precompute(root, teacher_dir, "heldout", split="heldout", limit=4, hidden=False),
    }


@pytest.fixture(scope="session")
def topk_stores(teacher_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topk_stores")
    return {
        "train": precompute(
            root, teacher_dir, "train", split="train", limit=8, hidden=False, top_k=TOPK_STORE_K
        ),
        "heldout": precompute(
            root, teacher_dir, "heldout", split="heldout", limit=4, hidden=False, top_k=TOPK_STORE_K
        ),
    }


@pytest.fixture(scope="session")
def same_tokenizer_student(teacher_dir, tmp_path_factory) -> Path:
    """Random weights with the teacher's own tokenizer (a same-tokenizer student that is not the teacher)."""
    from factories import tiny_llama

    from alm.train.student import load_tokenizer

    folder = tmp_path_factory.mktemp("same_tok_student")
    tokenizer = load_tokenizer(str(teacher_dir))
    tiny_llama(len(tokenizer), seed=99, hidden=32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
