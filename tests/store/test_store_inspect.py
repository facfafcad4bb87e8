"""`alm inspect` figures and `--compare` differences, pinned against direct numpy computations from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import byte_tokenizer
from store_helpers import make_plan

from alm.errors import StoreError
from alm.store.finalize import finalize_store
from alm.store.inspect import compare_stores, compare_stores_stats, inspect_stats, inspect_store
from alm.store.schema import BOUNDARY_CLASS_NAMES, DEFAULT_BOUNDARY_CLASSES
from alm.store.writer import ShardWriter, prepare_store
from alm.vocab import vocab_from_tokenizer

K = 8


def teacher_sequences(vocab, num_seqs=6, seed=0):
    """Sequences whose per-token arrays come from real softmax distributions over the byte vocabulary."""
    rng = np.random.default_rng(seed)
    size = vocab.size
    classes = vocab.boundary_class.astype(np.int64)
    seqs = []
    for i in range(num_seqs):
        n = int(rng.integers(3, 30))
        logits = rng.normal(size=(n, size)) * 3.0
        logits[:, 0x20] += rng.normal(size=n) * 4  # make the space class sometimes dominant
        logprobs = logits - np.log(
            np.exp(logits).sum(axis=1, keepdims=True)
        )  # [n, V] predicts token q+1
        token_id = rng.integers(0, 256, n).astype(np.int32)
        logp = np.full(n, np.nan, np.float32)
        logp[1:] = logprobs[np.arange(n - 1), token_id[1:]]
        bm = np.stack(
            [np.log(np.exp(logprobs[:, classes == c]).sum(axis=1)) for c in range(5)], axis=1
        )  # special class: -inf only if no special, the byte vocab has specials
        order = np.argsort(-logprobs, axis=1)[:, :K]
        text = bytes(token_id.astype(np.uint8))
        seqs.append(
            {
                "seq_id": i,
                "text": text,
                "token_id": token_id,
                "logp": logp,
                "boundary_logmass": bm.astype(np.float16),
                "topk_id": order.astype(np.int32),
                "topk_logp": np.take_along_axis(logprobs, order, axis=1).astype(np.float16),
                "segments": [
                    {"role": "text", "start_byte": 0, "end_byte": n, "start_pos": 0, "end_pos": n}
                ],
                "loss_spans": [(0, n)],
            }
        )
    return seqs


def build(path, vocab, seqs, num_shards=2, **plan_kw):
    plan = make_plan(
        num_shards=num_shards, top_k=K, tokenizer_fingerprint=vocab.fingerprint(), **plan_kw
    )
    layout = prepare_store(path, plan)
    layout.write_vocab(vocab)
    for j in range(num_shards):
        with ShardWriter(layout, j) as writer:
            for seq in seqs[j::num_shards]:
                writer.add(**seq)
    finalize_store(path)


@pytest.fixture(scope="module")
def vocab():
    return vocab_from_tokenizer(byte_tokenizer())


def test_inspect_figures_match_direct_computation(tmp_path, vocab):
    seqs = teacher_sequences(vocab)
    build(tmp_path, vocab, seqs)
    s = inspect_stats(tmp_path)
    logp = np.concatenate([q["logp"] for q in seqs]).astype(np.float64)
    bm = np.concatenate([q["boundary_logmass"] for q in seqs]).astype(
        np.float64
    )  # [N, 5] as stored (fp16)
    num_bytes = sum(len(q["text"]) for q in seqs)
    assert (
        s["num_sequences"] == len(seqs)
        and s["num_tokens"] == len(logp)
        and s["num_text_bytes"] == num_bytes
    )
    expected_bpb = -np.nansum(logp) / (num_bytes * math.log(2))
    assert s["teacher_bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-12)
    prob = np.exp(bm)
    for c, name in enumerate(BOUNDARY_CLASS_NAMES):
        assert s["boundary_mean_prob"][name] == pytest.approx(prob[:, c].mean(), rel=1e-9)
        assert s["boundary_frac_above_gamma"][name] == pytest.approx((prob[:, c] > 0.1).mean())
    total = prob[:, list(DEFAULT_BOUNDARY_CLASSES)].sum(
        axis=1
    )  # the one default set (alm.boundary)
    assert s["boundary_total_mean_prob"] == pytest.approx(total.mean(), rel=1e-9)
    assert s["boundary_total_frac_above_gamma"] == pytest.approx((total > 0.1).mean())
    # top-k bounds: lower = sum of top-k probs in the boundary set, upper = lower + mass outside the top-k
    topk_id = np.concatenate([q["topk_id"] for q in seqs])
    p_topk = np.exp(np.concatenate([q["topk_logp"] for q in seqs]).astype(np.float64))
    in_set = np.isin(vocab.boundary_class[topk_id], DEFAULT_BOUNDARY_CLASSES)
    lower = (p_topk * in_set).sum(axis=1)
    upper = lower + np.clip(1 - p_topk.sum(axis=1), 0, 1)
    t = s["topk_bound"]
    assert t["k"] == K
    assert t["lower_err_mean"] == pytest.approx((total - lower).mean(), rel=1e-9)
    assert t["lower_err_max"] == pytest.approx((total - lower).max(), rel=1e-9)
    assert t["upper_err_mean"] == pytest.approx((upper - total).mean(), rel=1e-9)
    assert t["upper_err_max"] == pytest.approx((upper - total).max(), rel=1e-9)
    assert (
        t["lower_err_max"] >= -1e-3 and t["upper_err_max"] >= -1e-3
    )  # bounds hold up to fp16 rounding

    def du(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    for name in ("token_id", "logp", "boundary_logmass", "topk_id"):
        assert s["disk_bytes_per_field"][name] == sum(
            du(d / "arrays" / name) for d in (tmp_path / "shards").iterdir()
        )
    default = sum(s["disk_bytes_per_field"][f] for f in ("token_id", "logp", "boundary_logmass"))
    assert s["bytes_per_token_default_fields"] == pytest.approx(default / len(logp))
    assert s["disk_bytes_total"] == du(tmp_path)
    report = inspect_store(tmp_path)
    assert f"{expected_bpb:.4f}" in report and "top-8 bounds" in report and "finished" in report


def test_compare_figures_match_direct_computation(tmp_path, vocab):
    seqs = teacher_sequences(vocab, seed=1)
    rng = np.random.default_rng(5)
    noisy = []
    for q in seqs:
        q2 = dict(q)
        q2["logp"] = (q["logp"] + rng.normal(size=len(q["logp"])) * 1e-3).astype(np.float32)
        bm = q["boundary_logmass"].astype(np.float32).copy()
        bm[:, 0] += rng.normal(size=len(bm)) * 0.5
        bm[0, 2] = -np.inf  # zero mass in one store only
        q2["boundary_logmass"] = bm.astype(np.float16)
        noisy.append(q2)
    build(tmp_path / "a", vocab, seqs, num_shards=2)
    build(
        tmp_path / "b", vocab, noisy, num_shards=3, boundary_method="topk_lower"
    )  # another shard layout
    s = compare_stores_stats(tmp_path / "a", tmp_path / "b")
    la = np.concatenate([q["logp"][1:] for q in seqs]).astype(np.float64)
    lb = np.concatenate([q["logp"][1:] for q in noisy]).astype(np.float64)
    assert s["logp"]["max"] == pytest.approx(np.abs(la - lb).max(), rel=1e-12)
    assert s["logp"]["mean"] == pytest.approx(np.abs(la - lb).mean(), rel=1e-12)
    ba = np.concatenate([q["boundary_logmass"] for q in seqs]).astype(np.float64)
    bb = np.concatenate([q["boundary_logmass"] for q in noisy]).astype(np.float64)
    d0 = np.abs(ba[:, 0] - bb[:, 0])
    assert s["boundary_logmass"]["space"]["max"] == pytest.approx(d0.max(), rel=1e-6)
    assert s["boundary_logmass"]["space"]["mean"] == pytest.approx(d0.mean(), rel=1e-6)
    assert s["boundary_logmass"]["tab"]["num_finite_mismatch"] == len(seqs)
    assert s["boundary_logmass"]["newline"]["max"] == 0.0
    default = list(DEFAULT_BOUNDARY_CLASSES)  # the one default set (alm.boundary)
    ta = np.log(np.exp(ba[:, default]).sum(axis=1))
    tb = np.log(np.exp(bb[:, default]).sum(axis=1))
    assert s["boundary_logmass"]["default_set"]["max"] == pytest.approx(
        np.abs(ta - tb).max(), rel=1e-5
    )
    expected_flips = int(((np.exp(ta) > 0.1) != (np.exp(tb) > 0.1)).sum())
    assert s["merge_decisions_differ"] == expected_flips
    assert s["num_positions"] == len(ba) and s["num_sequences"] == len(seqs)
    report = compare_stores(tmp_path / "a", tmp_path / "b")
    assert f"merge decisions that differ: {expected_flips:,}" in report and "topk_lower" in report


def test_compare_same_store_is_zero(tmp_path, vocab):
    build(tmp_path, vocab, teacher_sequences(vocab))
    s = compare_stores_stats(tmp_path, tmp_path)
    assert s["logp"]["max"] == 0 and s["merge_decisions_differ"] == 0
    assert all(
        d["max"] == 0 and d["num_finite_mismatch"] == 0 for d in s["boundary_logmass"].values()
    )


def test_compare_refuses_different_token_sequences(tmp_path, vocab):
    seqs = teacher_sequences(vocab)
    other = [dict(q) for q in seqs]
    other[3] = dict(other[3], token_id=(other[3]["token_id"] + 1) % 256)
    build(tmp_path / "a", vocab, seqs)
    build(tmp_path / "b", vocab, other)
    with pytest.raises(
        StoreError, match=r"different token sequences \(first difference in seq_id=3\)"
    ):
        compare_stores(tmp_path / "a", tmp_path / "b")
    build(tmp_path / "c", vocab, seqs[:-1])
    with pytest.raises(StoreError, match=r"hold different sequences.*only in the first: \[5\]"):
        compare_stores(tmp_path / "a", tmp_path / "c")


def test_inspect_reports_an_unfinished_store(tmp_path, vocab):
    plan = make_plan(num_shards=2, top_k=K)
    layout = prepare_store(tmp_path, plan)
    with ShardWriter(layout, 0) as writer:
        writer.add(**teacher_sequences(vocab, num_seqs=1)[0])
    assert "UNFINISHED (1/2 shards)" in inspect_store(tmp_path)


def test_store_vocab_round_trips_through_the_store(tmp_path, vocab):
    build(tmp_path, vocab, teacher_sequences(vocab))
    from alm.store.reader import open_store

    store = open_store(tmp_path)
    assert store.vocab.fingerprint() == vocab.fingerprint() == store.manifest.tokenizer_fingerprint
    assert store.manifest_doc is not None
    assert store.manifest_doc["vocab"]["table"] == "vocab/teacher_vocab.parquet"
