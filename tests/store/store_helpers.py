"""Helpers for the store tests: random sequences with the store's conventions, and whole-store writing."""

from __future__ import annotations

from typing import Any

import numpy as np

from alm.store.finalize import finalize_store
from alm.store.writer import ShardWriter, StorePlan, prepare_store

TOPK_FIELDS = ("token_id", "logp", "boundary_logmass", "topk_id", "topk_logp")


def make_plan(
    num_shards: int = 2,
    fields: tuple[str, ...] = TOPK_FIELDS,
    top_k: int = 4,
    hidden_size: int = 0,
    **kw: Any,
) -> StorePlan:
    return StorePlan(
        teacher_model="tiny-teacher",
        tokenizer_fingerprint=kw.pop("tokenizer_fingerprint", "tok-fp"),
        data_spec_name="unit",
        data_spec_fingerprint=kw.pop("data_spec_fingerprint", "data-fp"),
        num_shards=num_shards,
        max_length=64,
        fields=fields,
        top_k=top_k if "topk_id" in fields else 0,
        hidden_size=hidden_size,
        **kw,
    )


def segment(role: str, start_byte: int, end_byte: int, start_pos: int, end_pos: int) -> dict:
    """One row of a segment table, as `alm.templates.render` gives it."""
    return {
        "role": role,
        "start_byte": start_byte,
        "end_byte": end_byte,
        "start_pos": start_pos,
        "end_pos": end_pos,
    }


def random_sequence(
    rng: np.random.Generator,
    seq_id: int,
    plan: StorePlan,
    n: int | None = None,
    vocab_size: int = 300,
) -> dict[str, Any]:
    """One sequence as `ShardWriter.add` keyword arguments (log-probs are real log-softmax values)."""
    n = int(rng.integers(1, 40)) if n is None else n
    logits = rng.normal(size=(n + 1, vocab_size)) * 2.0
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))  # [n+1, V]
    token_id = rng.integers(0, vocab_size, n).astype(np.int32)
    logp = np.full(n, np.nan, dtype=np.float32)
    logp[1:] = logprobs[np.arange(n - 1), token_id[1:]]
    classes = rng.integers(0, 5, vocab_size)
    bm = np.stack(
        [np.log(np.exp(logprobs[1:, classes == c]).sum(axis=1)) for c in range(5)], axis=1
    )
    text = rng.integers(0, 256, int(rng.integers(0, 3 * n + 1))).astype(np.uint8).tobytes()
    seq: dict[str, Any] = {
        "seq_id": seq_id,
        "text": text,
        "token_id": token_id,
        "logp": logp,
        "boundary_logmass": bm.astype(np.float16),
        "segments": [segment("bos", 0, 0, 0, 1), segment("text", 0, len(text), 1, n)]
        if n > 1
        else [segment("text", 0, len(text), 0, n)],
        "loss_spans": [(0, len(text))],
        "truncated": bool(rng.integers(0, 2)),
        "doc_id": f"doc-{seq_id}",
        "source": "unit",
        "row": seq_id * 3,
    }
    if "topk_id" in plan.fields:
        order = np.argsort(-logprobs[1:], axis=1)[:, : plan.top_k]
        seq["topk_id"] = order.astype(np.int32)
        seq["topk_logp"] = np.take_along_axis(logprobs[1:], order, axis=1).astype(np.float16)
    if "hidden" in plan.fields:
        seq["hidden"] = rng.integers(0, 2**16, (n, plan.hidden_size)).astype(np.uint16)
    return seq


def write_store(
    path: Any,
    plan: StorePlan,
    sequences_per_shard: list[list[dict[str, Any]]],
    finalize: bool = True,
    chunk_tokens: int = 64,
    overwrite: bool = False,
    buffer_bytes: int = 256 << 20,
) -> None:
    layout = prepare_store(path, plan, overwrite=overwrite)
    for j, seqs in enumerate(sequences_per_shard):
        with ShardWriter(layout, j, chunk_tokens=chunk_tokens, buffer_bytes=buffer_bytes) as writer:
            for seq in seqs:
                writer.add(**seq)
    if finalize:
        finalize_store(path)


def random_store(
    path: Any, plan: StorePlan, num_per_shard: int = 4, seed: int = 0, **kw: Any
) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    shards = [
        [random_sequence(rng, j * 1000 + i, plan) for i in range(num_per_shard)]
        for j in range(plan.num_shards)
    ]
    write_store(path, plan, shards, **kw)
    return shards
