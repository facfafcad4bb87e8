"""`alm verify STORE` and `alm train --dry-run`'s store check: every file and every value of a teacher store.

Owns the whole-store check (`DESIGN.md` "Stores never lie", issue 9): the manifest against the plan (fingerprints,
shard list, totals) and its own checksum; the plan, vocabulary and tokenizer files against the manifest's
inventory; every shard's `shard.json` against the manifest and every file of the shard against `shard.json`
(sizes and sha256); the index against the arrays (token ranges tile the shard, counts, unique sequence ids); and,
with `values=True`, every value against its invariants:

- `logp` is NaN at each sequence's first token and finite and <= 0 (up to fp32 rounding) everywhere else;
- `boundary_logmass` has no NaN and the log-sum-exp of its classes is <= 0 (up to float16 rounding);
- `token_id` and `topk_id` lie inside the teacher vocabulary; `topk_logp` is <= 0.

The re-tokenization of the text and the teacher re-scoring of `--deep` need the tokenizer and the model and
live above the store layer (`alm.verify`). Imports numpy, pyarrow and the store modules only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alm.errors import StoreCorruptError, StoreError
from alm.store import schema
from alm.store.reader import ShardData, TeacherStore, open_store

# fp32 log-softmax can round the top token's log-prob a few ulps above 0; float16 masses round by 2^-11.
LOGP_MAX = 1e-5
BOUNDARY_LOGSUMEXP_MAX = 2e-3


@dataclass
class VerifyReport:
    """What `verify_store` checked and the problems it found (the first one is the one to fix first)."""

    url: str
    num_shards: int = 0
    num_shards_checked: int = 0
    num_sequences: int = 0
    num_tokens: int = 0
    num_files: int = 0
    num_file_bytes: int = 0
    values_checked: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = "files, checksums and values" if self.values_checked else "files and checksums"
        head = (
            f"teacher store {self.url}: {self.num_shards_checked}/{self.num_shards} shards, "
            f"{self.num_sequences:,} sequences, {self.num_tokens:,} tokens, {self.num_files:,} files "
            f"({self.num_file_bytes:,} bytes) checked ({what})"
        )
        if self.ok:
            return f"{head}: OK"
        lines = [f"{head}: {len(self.problems)} problem(s); the first:", f"  {self.problems[0]}"]
        lines += [f"  {p}" for p in self.problems[1:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


def _message(err: Exception) -> str:
    return getattr(err, "summary", None) or str(err)


def _check_manifest(store: TeacherStore, report: VerifyReport) -> None:
    manifest, plan = store.manifest, store.plan_doc.get("plan", {})
    recorded_facts = {
        "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
        "data_spec_fingerprint": manifest.data_spec_fingerprint,
    }
    for key, recorded in recorded_facts.items():
        if recorded != plan.get(key):
            report.problems.append(
                f"{schema.MANIFEST_FILE}: {key} {recorded!r} differs from the plan's {plan.get(key)!r}"
            )
    if manifest.plan_fingerprint != store.plan_doc.get("plan_fingerprint"):
        report.problems.append(
            f"{schema.MANIFEST_FILE}: plan_fingerprint differs from {schema.PLAN_FILE}'s"
        )
    indices = sorted(store.shard_indices)
    if indices != list(range(int(plan.get("num_shards", len(indices))))):
        report.problems.append(
            f"{schema.MANIFEST_FILE} lists shards {indices}, the plan has {plan.get('num_shards')}"
        )
    shard_sums = {
        "num_sequences": manifest.num_sequences,
        "num_tokens": manifest.num_tokens,
        "num_text_bytes": manifest.num_text_bytes,
    }
    for key, total in shard_sums.items():
        recorded_total = manifest.recorded_totals.get(key)
        if recorded_total is not None and recorded_total != total:
            report.problems.append(
                f"{schema.MANIFEST_FILE}: totals.{key} is {recorded_total}, its shards sum to {total}"
            )
    for entry in manifest.files.values():
        report.num_files += 1
        report.num_file_bytes += int(entry["num_bytes"])
    if schema.VOCAB_TABLE_FILE in manifest.files:
        metadata = store.vocab_table.schema.metadata or {}
        stored = metadata.get(b"fingerprint", b"").decode()
        if stored and stored != manifest.tokenizer_fingerprint:
            report.problems.append(
                f"{schema.VOCAB_TABLE_FILE}: fingerprint {stored} differs from the manifest's "
                f"tokenizer_fingerprint {manifest.tokenizer_fingerprint}"
            )


def _check_tiling(shard: ShardData, doc: dict[str, Any], where: str) -> list[str]:
    starts = shard.index.column("token_start").to_numpy()
    ends = shard.index.column("token_end").to_numpy()
    lengths = shard.index.column("num_tokens").to_numpy()
    num_tokens = int(doc["num_tokens"])
    contiguous = np.array_equal(starts, np.concatenate([[0], ends[:-1]])) if len(starts) else True
    problems = []
    index_rel = doc.get("index", {}).get("file", schema.INDEX_FILE_V2)
    if (
        not contiguous
        or not np.array_equal(ends - starts, lengths)
        or int(lengths.sum()) != num_tokens
    ):
        problems.append(f"{where}/{index_rel}: token ranges do not tile the {num_tokens} tokens")
    texts = shard.index.column("text").to_pylist()
    if [len(t) for t in texts] != shard.index.column("num_bytes").to_pylist():
        problems.append(f"{where}/{index_rel}: num_bytes differs from the stored text")
    return problems


def value_problems(shard: ShardData, vocab_size: int | None, where: str) -> list[str]:
    """Problems of the values of one shard (see the module docstring), naming the sequence and field."""
    problems: list[str] = []
    seq_ids = shard.index.column("seq_id").to_numpy()
    starts = shard.index.column("token_start").to_numpy()
    num_tokens = shard.num_tokens
    row_of = np.zeros(num_tokens, dtype=np.int64)  # [N] row of each token
    if len(starts):
        row_of[starts[1:]] = 1
        row_of = np.cumsum(row_of)
    first = np.zeros(num_tokens, dtype=bool)
    first[starts[starts < num_tokens]] = True

    def report(field_name: str, bad: Any, what: str) -> None:
        positions = np.flatnonzero(bad)
        if len(positions):
            q = int(positions[0])
            row = int(row_of[q])
            problems.append(
                f"{where}: sequence seq_id={int(seq_ids[row])} (row {row}), field {field_name}, token "
                f"{q - int(starts[row])}: {what} ({len(positions)} position(s) in this shard)"
            )

    arrays = shard.arrays
    logp = arrays["logp"].astype(np.float64)
    report("logp", first & ~np.isnan(logp), "the first token's logp must be NaN")
    rest = logp[~first]
    bad = np.zeros(num_tokens, dtype=bool)
    bad[~first] = ~np.isfinite(rest) | (rest > LOGP_MAX)
    report("logp", bad, "logp must be finite and <= 0")
    bm = arrays["boundary_logmass"].astype(np.float64)  # [N, C]
    report("boundary_logmass", np.isnan(bm).any(axis=1), "NaN boundary log-mass")
    top = np.max(bm, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (safe + np.log(np.sum(np.exp(bm - safe), axis=1, keepdims=True)))[:, 0]
    report(
        "boundary_logmass",
        np.nan_to_num(lse, nan=0.0, neginf=-1.0) > BOUNDARY_LOGSUMEXP_MAX,
        "the classes' masses sum to more than 1",
    )
    if vocab_size is not None:
        ids = arrays["token_id"]
        report(
            "token_id",
            (ids < 0) | (ids >= vocab_size),
            f"id outside the vocabulary 0..{vocab_size - 1}",
        )
        if "topk_id" in arrays:
            topk = arrays["topk_id"]
            report(
                "topk_id",
                ((topk < 0) | (topk >= vocab_size)).any(axis=1),
                "id outside the vocabulary",
            )
    if "topk_logp" in arrays:
        topk_logp = arrays["topk_logp"].astype(np.float64)
        report("topk_logp", (np.isnan(topk_logp) | (topk_logp > 1e-3)).any(axis=1), "must be <= 0")
    return problems


def verify_store(
    path_or_url: str | os.PathLike[str] | TeacherStore,
    *,
    values: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
    on_values: Callable[[TeacherStore, ShardData], list[str]] | None = None,
) -> VerifyReport:
    """Check a finished store: every file against the recorded sizes and checksums, and (with `values`) every
    value against its invariants. Never raises for a damaged store: the problems are in the report.

    Each file is read once: a shard's files are checked as they are read and decoded, and the files no read
    needs (none in a store alm wrote) are read only to be checked.

    Args:
        path_or_url: the store root, or a store already opened (its checked store-level files are not read
            again).
        values: also check the values (logp, boundary masses, ids); otherwise files and checksums only.
        on_shard: called with (shards done, shards in all) after each shard, for a progress bar.
        on_values: an extra per-shard check (returns problems), e.g. re-tokenizing the text (`alm.verify`).

    Raises:
        StoreError: there is no finished store at that path (nothing to verify).
    """
    if isinstance(path_or_url, TeacherStore):
        store = path_or_url
        report = VerifyReport(url=store.url, values_checked=values)
    else:
        report = VerifyReport(url=str(path_or_url), values_checked=values)
        try:
            store = open_store(path_or_url)
        except StoreCorruptError as err:
            report.problems.append(_message(err))
            return report
    report.url = store.url
    report.num_shards = len(store.shard_indices)
    _check_manifest(store, report)
    vocab_size = None
    try:
        vocab_size = store.vocab_table.num_rows
    except StoreError as err:
        report.problems.append(_message(err))
    seen_ids: dict[int, int] = {}
    for done, j in enumerate(store.shard_indices, start=1):
        where = schema.shard_path(j)
        try:
            check = store.shard_check(j)
            shard = store.read_shard(j, check=check)
            for rel in sorted(set(check.files or ()) - check.seen):
                check.read(store.location, rel)
        except StoreError as err:
            report.problems.append(_message(err))
            if on_shard:
                on_shard(done, report.num_shards)
            continue
        doc = store.shard_doc(j)
        plan = store.plan_doc.get("plan", {})
        for key in ("tokenizer_fingerprint", "data_spec_fingerprint"):
            if doc.get(key) != plan.get(key):
                report.problems.append(
                    f"{where}/{schema.SHARD_FILE}: {key} differs from the plan's"
                )
        report.problems.extend(_check_tiling(shard, doc, where))
        for seq_id in shard.index.column("seq_id").to_pylist():
            if seq_id in seen_ids:
                report.problems.append(
                    f"{where}: sequence seq_id={seq_id} is also stored in shard {seen_ids[seq_id]}"
                )
            seen_ids[seq_id] = j
        if check.files is not None:
            report.num_files += len(check.files) + 1
            report.num_file_bytes += sum(int(e["num_bytes"]) for e in check.files.values())
        if values:
            report.problems.extend(value_problems(shard, vocab_size, where))
            if on_values is not None:
                report.problems.extend(on_values(store, shard))
        report.num_shards_checked += 1
        report.num_sequences += shard.index.num_rows
        report.num_tokens += shard.num_tokens
        if on_shard:
            on_shard(done, report.num_shards)
    return report


def shard_progress(label: str) -> Callable[[int, int], None]:
    """An `on_shard` callback drawing a tqdm bar over shards (only for stores of more than one shard)."""
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if total <= 1:
            return
        if "bar" not in state:
            from tqdm.auto import tqdm

            state["bar"] = tqdm(total=total, unit="shard", desc=label, dynamic_ncols=True)
        state["bar"].update(1)
        if done == total:
            state["bar"].close()

    return update


def check_store_files(
    path_or_url: str | os.PathLike[str], label: str = "check store"
) -> VerifyReport:
    """Files and checksums of every shard (no value checks), with a progress bar: `alm train --dry-run`.

    Raises:
        StoreCorruptError: naming the first damaged file (and listing the others).
        StoreError: no finished store there.
    """
    report = verify_store(
        path_or_url, values=False, on_shard=shard_progress(f"{label} {path_or_url}")
    )
    if not report.ok:
        raise StoreCorruptError(report.summary())
    return report
