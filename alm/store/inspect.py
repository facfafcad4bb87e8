"""`alm inspect`: a readable report of one teacher store, and the comparison of two stores on the same data.

Owns the statistics behind `alm inspect STORE` (sizes, bytes per token, fingerprints, teacher bits per byte,
boundary-mass statistics, and with top-k stored how tightly top-k bounds the exact boundary mass, `ALM_SPEC.md`
§10.2 option 3) and `alm inspect STORE --compare OTHER` (fidelity of one store against another, e.g. vLLM top-k
bounds against the exact HF store). Every figure is also returned as a dict (`inspect_stats`,
`compare_stores_stats`) for tests and docs. Imports numpy and the store reader only.

Teacher bits per byte: `BPB = -Σ_seq Σ_{q>=1} logp[q] / (Σ_seq num_bytes · ln 2)`: every stored teacher token after
the first of its sequence counts (template/special tokens too: they have no bytes but their log-probs are real),
and every content byte of the stored text counts (`num_bytes`, the text the teacher read). The first token has no
log-prob; when it is BOS (no bytes) the ratio is exactly the teacher's per-byte cross-entropy on the text.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from alm.errors import StoreError
from alm.store import schema
from alm.store.reader import TeacherStore, open_store

GAMMA = 0.1  # ALM's merge threshold (ALM_SPEC.md §5.3): a chunk ends where exp(boundary logmass) > gamma


def _logsumexp_classes(boundary_logmass: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """float64 [N]: log of the summed mass of `classes` (a boundary set) from per-class log-masses [N, C]."""
    sel = boundary_logmass[:, list(classes)].astype(np.float64)  # [N, |classes|]
    top = np.max(sel, axis=1, keepdims=True)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (safe_top + np.log(np.sum(np.exp(sel - safe_top), axis=1, keepdims=True)))[:, 0]


def _store_of(store: str | os.PathLike[str] | TeacherStore, allow_unfinished: bool) -> TeacherStore:
    return (
        store
        if isinstance(store, TeacherStore)
        else open_store(store, allow_unfinished=allow_unfinished)
    )


def inspect_stats(store: str | os.PathLike[str] | TeacherStore) -> dict[str, Any]:
    """Every figure of `inspect_store` as a dict (see the module docstring for the definitions)."""
    st = _store_of(store, allow_unfinished=True)
    loc = st.location
    num_tokens = num_text_bytes = num_sequences = 0
    nll_nat = 0.0
    class_mass_sum = np.zeros(schema.NUM_BOUNDARY_CLASSES)
    class_above_gamma = np.zeros(schema.NUM_BOUNDARY_CLASSES)
    total_mass_sum = 0.0
    total_above_gamma = 0
    # top-k bounds need the vocabulary's boundary classes
    has_topk = "topk_id" in st.fields and loc.exists(schema.VOCAB_TABLE_FILE)
    boundary_class = None
    if has_topk:
        boundary_class = st.vocab_table.column("boundary_class").to_numpy().astype(np.int64)  # [V]
    lower_err: list[np.ndarray] = []
    upper_err: list[np.ndarray] = []
    for shard in st.iter_shards([f for f in st.fields if f != "hidden"]):
        num_sequences += shard.index.num_rows
        num_tokens += shard.num_tokens
        num_text_bytes += int(shard.index.column("num_bytes").to_numpy().sum())
        logp = shard.arrays["logp"].astype(np.float64)
        nll_nat -= float(np.nansum(logp))
        bm = shard.arrays["boundary_logmass"].astype(np.float32)  # [N, C]
        prob = np.exp(bm.astype(np.float64))
        class_mass_sum += prob.sum(axis=0)
        class_above_gamma += (prob > GAMMA).sum(axis=0)
        total = np.exp(_logsumexp_classes(bm, schema.DEFAULT_BOUNDARY_CLASSES))  # [N]
        total_mass_sum += float(total.sum())
        total_above_gamma += int((total > GAMMA).sum())
        if has_topk and boundary_class is not None:
            p_topk = np.exp(shard.arrays["topk_logp"].astype(np.float64))  # [N, k]
            in_set = np.isin(
                boundary_class[shard.arrays["topk_id"]], schema.DEFAULT_BOUNDARY_CLASSES
            )  # [N, k]
            lower = (p_topk * in_set).sum(axis=1)
            upper = lower + np.clip(1.0 - p_topk.sum(axis=1), 0.0, 1.0)
            lower_err.append(total - lower)
            upper_err.append(upper - total)
    n = max(num_tokens, 1)
    stats: dict[str, Any] = {
        "url": st.url,
        "finished": st.is_finished,
        "num_shards_done": len(st.shard_indices),
        "num_shards_planned": st.manifest.num_shards or len(st.shard_indices),
        "num_sequences": num_sequences,
        "num_tokens": num_tokens,
        "num_text_bytes": num_text_bytes,
        "fields": dict(st.field_specs),
        "teacher_bits_per_byte": nll_nat / (max(num_text_bytes, 1) * math.log(2)),
        "boundary_mean_prob": {
            name: float(class_mass_sum[i] / n) for i, name in enumerate(schema.BOUNDARY_CLASS_NAMES)
        },
        "boundary_frac_above_gamma": {
            name: float(class_above_gamma[i] / n)
            for i, name in enumerate(schema.BOUNDARY_CLASS_NAMES)
        },
        "boundary_total_mean_prob": total_mass_sum / n,
        "boundary_total_frac_above_gamma": total_above_gamma / n,
    }
    field_bytes = {}
    for name in st.field_specs:
        field_bytes[name] = sum(
            loc.size_bytes(schema.shard_path(j), schema.ARRAYS_DIR, name) for j in st.shard_indices
        )
    stats["disk_bytes_per_field"] = field_bytes
    stats["disk_bytes_index"] = sum(
        loc.size_bytes(schema.shard_path(j), schema.index_file(st.format_version))
        for j in st.shard_indices
    )
    stats["disk_bytes_total"] = loc.size_bytes()
    stats["bytes_per_token_default_fields"] = sum(field_bytes[f] for f in schema.DEFAULT_FIELDS) / n
    stats["bytes_per_token_total"] = stats["disk_bytes_total"] / n
    manifest = st.manifest
    stats["fingerprints"] = {
        "teacher_model": manifest.teacher_model,
        "teacher_revision": manifest.teacher_revision,
        "teacher_config_hash": manifest.teacher_config_hash,
        "tokenizer": manifest.tokenizer_fingerprint,
        "data_spec": f"{manifest.data_spec_name} {manifest.data_spec_fingerprint}",
        "plan": manifest.plan_fingerprint,
        "backend": f"{manifest.backend} ({manifest.boundary_method})",
    }
    if has_topk and lower_err:
        low = np.concatenate(lower_err)
        up = np.concatenate(upper_err)
        stats["topk_bound"] = {
            "k": manifest.top_k,
            "lower_err_mean": float(low.mean()),
            "lower_err_max": float(low.max()),
            "upper_err_mean": float(up.mean()),
            "upper_err_max": float(up.max()),
        }
    return stats


def inspect_store(store: str | os.PathLike[str] | TeacherStore) -> str:
    """A readable multi-line report of a store (finished or not); see `inspect_stats` for the figures."""
    s = inspect_stats(store)
    status = (
        "finished"
        if s["finished"]
        else f"UNFINISHED ({s['num_shards_done']}/{s['num_shards_planned']} shards)"
    )
    lines = [
        f"teacher store {s['url']}: {status}",
        f"  sequences {s['num_sequences']:,}  tokens {s['num_tokens']:,}  text bytes {s['num_text_bytes']:,}",
        f"  disk: {s['bytes_per_token_default_fields']:.2f} B/token (default fields), "
        f"{s['bytes_per_token_total']:.2f} B/token (whole store, {s['disk_bytes_total']:,} B)",
        "  fields:",
    ]
    n = max(s["num_tokens"], 1)
    for name, spec in s["fields"].items():
        shape = "x".join(str(d) for d in spec["shape"])
        lines.append(
            f"    {name:18s} {spec['dtype']:8s} [{shape}]  {s['disk_bytes_per_field'][name] / n:.2f} B/token"
        )
    lines.append("  fingerprints:")
    lines += [f"    {k:20s} {v}" for k, v in s["fingerprints"].items()]
    lines.append(f"  teacher bits per byte on the stored text: {s['teacher_bits_per_byte']:.4f}")
    lines.append(
        f"  boundary mass per class (mean prob, fraction of positions with prob > {GAMMA}):"
    )
    for name in schema.BOUNDARY_CLASS_NAMES:
        lines.append(
            f"    {name:18s} {s['boundary_mean_prob'][name]:.4f}  {s['boundary_frac_above_gamma'][name]:.4f}"
        )
    lines.append(
        f"    {'all (default set)':18s} {s['boundary_total_mean_prob']:.4f}  {s['boundary_total_frac_above_gamma']:.4f}"
    )
    if "topk_bound" in s:
        t = s["topk_bound"]
        lines.append(
            f"  top-{t['k']} bounds on the default boundary mass (prob): lower bound error mean {t['lower_err_mean']:.4g}"
            f" max {t['lower_err_max']:.4g}; upper bound error mean {t['upper_err_mean']:.4g} max {t['upper_err_max']:.4g}"
        )
    return "\n".join(lines)


def _sequences_by_id(st: TeacherStore) -> dict[str, Any]:
    """All sequences of a store concatenated in seq_id order: ids, offsets and the compared arrays."""
    seq_ids, lengths, token_id, logp, bm = [], [], [], [], []
    for shard in st.iter_shards(["token_id", "logp", "boundary_logmass"]):
        seq_ids.append(shard.index.column("seq_id").to_numpy())
        starts = shard.index.column("token_start").to_numpy()
        ends = shard.index.column("token_end").to_numpy()
        lengths.append(ends - starts)
        order_tokens = (
            np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
            if len(starts)
            else np.zeros(0, int)
        )
        token_id.append(shard.arrays["token_id"][order_tokens])
        logp.append(shard.arrays["logp"][order_tokens])
        bm.append(shard.arrays["boundary_logmass"][order_tokens].astype(np.float32))
    ids = np.concatenate(seq_ids) if seq_ids else np.zeros(0, np.int64)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    order = np.argsort(ids, kind="stable")
    tok_order = (
        np.concatenate([np.arange(int(offsets[i]), int(offsets[i + 1])) for i in order])
        if len(order)
        else np.zeros(0, int)
    )
    cat = lambda parts: np.concatenate(parts)[tok_order] if parts else np.zeros(0)  # noqa: E731
    return {
        "seq_id": ids[order],
        "length": lens[order],
        "token_id": cat(token_id),
        "logp": cat(logp),
        "boundary_logmass": np.concatenate(bm)[tok_order]
        if bm
        else np.zeros((0, schema.NUM_BOUNDARY_CLASSES)),
    }


def _abs_diff_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """max/mean |a-b| over positions where both are finite, and how many positions differ in finiteness."""
    both = np.isfinite(a) & np.isfinite(b)
    same_inf = (~np.isfinite(a)) & (a == b)  # both -inf (or both +inf): no difference
    diff = np.abs(a[both].astype(np.float64) - b[both].astype(np.float64))
    return {
        "max": float(diff.max()) if diff.size else 0.0,
        "mean": float(diff.mean()) if diff.size else 0.0,
        "num_compared": int(both.sum()),
        "num_finite_mismatch": int((~both & ~same_inf).sum()),
    }


def compare_stores_stats(
    store_a: str | os.PathLike[str] | TeacherStore, store_b: str | os.PathLike[str] | TeacherStore
) -> dict[str, Any]:
    """Differences of two stores on the same token sequences (matched by seq_id), as a dict.

    Keys: `logp` (|Δlogp| over positions q >= 1), `boundary_logmass` per class name and `default_set`
    (classes 0-4 combined with logsumexp) (|Δ| over positions where both are finite, plus finiteness mismatches),
    `merge_decisions_differ` (positions where exp(default-set logmass) > 0.1 holds in one store only),
    `num_positions`, `num_sequences`.

    Raises:
        StoreError: the stores hold different sequences or different token ids.
    """
    a, b = _store_of(store_a, False), _store_of(store_b, False)
    da, db = _sequences_by_id(a), _sequences_by_id(b)
    if not np.array_equal(da["seq_id"], db["seq_id"]):
        only_a = np.setdiff1d(da["seq_id"], db["seq_id"])[:5].tolist()
        only_b = np.setdiff1d(db["seq_id"], da["seq_id"])[:5].tolist()
        raise StoreError(
            f"stores {a.url} and {b.url} hold different sequences ({len(da['seq_id'])} vs {len(db['seq_id'])}; "
            f"only in the first: {only_a}, only in the second: {only_b}); compare stores made from the same data spec"
        )
    if not np.array_equal(da["length"], db["length"]) or not np.array_equal(
        da["token_id"], db["token_id"]
    ):
        lens_equal = np.array_equal(da["length"], db["length"])
        if lens_equal:
            offsets = np.concatenate([[0], np.cumsum(da["length"])])
            bad_pos = int(np.flatnonzero(da["token_id"] != db["token_id"])[0])
            bad = int(da["seq_id"][np.searchsorted(offsets, bad_pos, side="right") - 1])
        else:
            bad = int(da["seq_id"][np.flatnonzero(da["length"] != db["length"])[0]])
        raise StoreError(
            f"stores {a.url} and {b.url} hold different token sequences (first difference in seq_id={bad}); "
            "they must come from the same teacher tokenizer and data to be compared"
        )
    first = np.concatenate([[0], np.cumsum(da["length"])[:-1]]).astype(np.int64)
    scored = np.ones(len(da["logp"]), dtype=bool)
    scored[first] = False  # q = 0 has no log-prob
    out: dict[str, Any] = {
        "num_sequences": len(da["seq_id"]),
        "num_positions": len(da["logp"]),
        "logp": _abs_diff_stats(da["logp"][scored], db["logp"][scored]),
        "boundary_logmass": {
            name: _abs_diff_stats(da["boundary_logmass"][:, i], db["boundary_logmass"][:, i])
            for i, name in enumerate(schema.BOUNDARY_CLASS_NAMES)
        },
    }
    total_a = _logsumexp_classes(da["boundary_logmass"], schema.DEFAULT_BOUNDARY_CLASSES)
    total_b = _logsumexp_classes(db["boundary_logmass"], schema.DEFAULT_BOUNDARY_CLASSES)
    out["boundary_logmass"]["default_set"] = _abs_diff_stats(total_a, total_b)
    with np.errstate(over="ignore"):
        merge_a = np.exp(total_a) > GAMMA
        merge_b = np.exp(total_b) > GAMMA
    out["merge_decisions_differ"] = int((merge_a != merge_b).sum())
    out["gamma"] = GAMMA
    return out


def compare_stores(
    store_a: str | os.PathLike[str] | TeacherStore, store_b: str | os.PathLike[str] | TeacherStore
) -> str:
    """A readable report of `compare_stores_stats`.

    Raises:
        StoreError: the stores hold different token sequences.
    """
    a, b = _store_of(store_a, False), _store_of(store_b, False)
    s = compare_stores_stats(a, b)

    def method(store: TeacherStore) -> str:
        manifest = store.manifest
        k = manifest.boundary_top_k
        return f"{manifest.backend}, {manifest.boundary_method}" + (f", k={k}" if k else "")

    method_a, method_b = method(a), method(b)
    lines = [
        f"compare {a.url} ({method_a}) with {b.url} ({method_b})",
        f"  {s['num_sequences']:,} sequences, {s['num_positions']:,} positions",
        f"  |Δlogp| (q >= 1): max {s['logp']['max']:.4g}  mean {s['logp']['mean']:.4g}"
        + (
            f"  ({s['logp']['num_finite_mismatch']} non-finite mismatches)"
            if s["logp"]["num_finite_mismatch"]
            else ""
        ),
        "  |Δboundary_logmass| (where both finite):",
    ]
    for name, d in s["boundary_logmass"].items():
        extra = (
            f"  ({d['num_finite_mismatch']} positions finite in one store only)"
            if d["num_finite_mismatch"]
            else ""
        )
        lines.append(f"    {name:18s} max {d['max']:.4g}  mean {d['mean']:.4g}{extra}")
    lines.append(
        f"  gamma={s['gamma']} merge decisions that differ: {s['merge_decisions_differ']:,} of {s['num_positions']:,}"
        f" ({s['merge_decisions_differ'] / max(s['num_positions'], 1):.4%})"
    )
    return "\n".join(lines)
