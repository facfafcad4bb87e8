"""`alm verify STORE [--deep]`: check a teacher store end to end (issue 9; `DESIGN.md` "Stores never lie").

    alm verify out/store            # every file and checksum, every value's invariants, the text re-tokenized
    alm verify out/store --deep     # and re-score a sample of sequences with the teacher: the largest difference

What the store layer checks is in `alm.store.verify`; this module adds what needs the teacher tokenizer (saved in
the store's `vocab/tokenizer/`): every sequence that was not truncated re-renders from its stored text bytes and
segments to exactly the stored teacher ids (`alm.templates.render`, the precompute's own rule), and every
alignment cache under `alignments/` is checked too (`alm.store.alignments.verify_cache`). `--deep` loads
the teacher model the manifest names and re-scores a fixed sample of sequences; it reports the largest absolute
difference of `logp` and `boundary_logmass` (the stored float16 masses round by about 2^-11 relative).

Imports `alm.store`, `alm.templates`, `alm.vocab`, and `alm.teacher` for the tokenizer and `--deep`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from alm.errors import AlmError, StoreCorruptError
from alm.store import schema
from alm.store.reader import ShardData, StoredSequence, TeacherStore
from alm.store.verify import VerifyReport, shard_progress, verify_store

logger = logging.getLogger(__name__)

DEEP_SAMPLE_SEQUENCES = 16


def _load_store_tokenizer(store: TeacherStore) -> Any:
    """The store's teacher tokenizer, loaded from the bytes checked against the manifest when the store was
    opened (written to a temporary folder: the files are read from the store once, and what is loaded is what
    was checked); from `vocab/tokenizer/` itself for a store whose manifest does not list them."""
    from alm.teacher.hf import load_tokenizer

    files = store.tokenizer_files()
    if files is None:
        return load_tokenizer(store.tokenizer_path)
    with tempfile.TemporaryDirectory(prefix="alm-verify-tokenizer-") as folder:
        for name, data in files.items():
            path = os.path.join(folder, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
        return load_tokenizer(folder)


class _Retokenizer:
    """Re-renders stored sequences with the store's own teacher tokenizer and template family."""

    def __init__(self, store: TeacherStore) -> None:
        self.tokenizer = _load_store_tokenizer(store)
        self.vocab = store.vocab
        self.family = store.manifest.settings.get("family") or "plain"
        self.max_length = store.manifest.max_length

    def __call__(self, store: TeacherStore, shard: ShardData) -> list[str]:
        from alm.templates import document_from_stored, render

        problems = []
        for seq in shard.sequences():
            if seq.truncated:
                continue  # cut where the tokens stopped: the last token may merge differently
            where = f"{schema.shard_path(shard.shard_index)}: sequence seq_id={seq.seq_id}, field token_id"
            try:
                rendered = render(
                    document_from_stored(seq),
                    self.tokenizer,
                    self.vocab,
                    self.family,
                    self.max_length,
                )
            except AlmError as err:
                problems.append(f"{where}: its text does not re-tokenize ({err})")
                continue
            if not np.array_equal(rendered.token_id, seq.token_id):
                n = min(len(rendered.token_id), seq.num_tokens)
                mismatch = np.flatnonzero(rendered.token_id[:n] != seq.token_id[:n])
                first = int(mismatch[0]) if len(mismatch) else n
                problems.append(
                    f"{where}: the stored text re-tokenizes to other ids from token {first} on "
                    f"({len(rendered.token_id)} tokens, {seq.num_tokens} stored)"
                )
        return problems


def deep_sample_positions(
    store: TeacherStore, num_sequences: int = DEEP_SAMPLE_SEQUENCES
) -> set[int]:
    """Which sequences `--deep` re-scores: a fixed sample of positions in stored order."""
    rng = np.random.default_rng(0)
    total = store.num_sequences
    return set(rng.choice(total, size=min(num_sequences, total), replace=False).tolist())


class _DeepSample:
    """Keeps the `--deep` sample's sequences (copies) as the verify pass reads each shard, so the shards are not
    read a second time; an `on_values` callback that finds no problems itself."""

    def __init__(self, store: TeacherStore) -> None:
        self.wanted = deep_sample_positions(store)
        self.position = 0
        self.sequences: list[StoredSequence] = []

    def __call__(self, store: TeacherStore, shard: ShardData) -> list[str]:
        for seq in shard.sequences():
            if self.position in self.wanted:
                self.sequences.append(
                    dataclasses.replace(
                        seq,
                        token_id=seq.token_id.copy(),
                        logp=seq.logp.copy(),
                        boundary_logmass=seq.boundary_logmass.copy(),
                    )
                )
            self.position += 1
        return []


def deep_rescore(
    store: TeacherStore,
    num_sequences: int = DEEP_SAMPLE_SEQUENCES,
    sequences: list[StoredSequence] | None = None,
) -> dict[str, Any]:
    """Re-score a fixed sample of stored sequences with the teacher the manifest names.

    Args:
        store: the store.
        num_sequences: the sample's size.
        sequences: the sample, already read (`alm verify --deep` collects it while verifying); default: read
            from the store (`deep_sample_positions`).

    Returns:
        `num_sequences`, `num_tokens`, `max_abs_logp_diff`, `max_abs_boundary_logmass_diff` (nats; positions
        where both are -inf count as equal) and where the largest `logp` difference is.

    Raises:
        ConfigError: the teacher model cannot be loaded.
    """
    from alm.teacher.default import resolve_teacher_path
    from alm.teacher.hf import HFTeacher

    manifest = store.manifest
    if manifest.teacher_model is None:
        raise StoreCorruptError(
            f"{store.url}/{schema.MANIFEST_FILE} names no teacher model; --deep cannot re-score it"
        )
    teacher = HFTeacher(
        resolve_teacher_path(manifest.teacher_model),
        store.vocab.boundary_class,
        revision=manifest.teacher_revision,
        dtype=manifest.settings.get("teacher_dtype", "auto"),
        device="auto",
    )
    if sequences is None:
        sequences = []
        wanted = deep_sample_positions(store, num_sequences)
        position = 0
        for shard in store.iter_shards(["token_id", "logp", "boundary_logmass"]):
            for seq in shard.sequences():
                if position in wanted:
                    sequences.append(seq)
                position += 1
    scores = teacher.score([seq.token_id for seq in sequences])
    worst_logp, worst_bm, where = 0.0, 0.0, ""
    for seq, score in zip(sequences, scores, strict=True):
        diff = np.abs(score.logp[1:].astype(np.float64) - seq.logp[1:].astype(np.float64))
        if len(diff) and float(diff.max()) > worst_logp:
            worst_logp = float(diff.max())
            where = f"seq_id={seq.seq_id} token {int(diff.argmax()) + 1}"
        stored = seq.boundary_logmass.astype(np.float64)
        fresh = score.boundary_logmass.astype(np.float64)
        both_zero = np.isneginf(stored) & np.isneginf(fresh)
        bm_diff = np.where(both_zero, 0.0, np.abs(fresh - stored))
        worst_bm = max(worst_bm, float(np.nan_to_num(bm_diff, nan=np.inf).max(initial=0.0)))
    return {
        "num_sequences": len(sequences),
        "num_tokens": int(sum(seq.num_tokens for seq in sequences)),
        "max_abs_logp_diff": worst_logp,
        "max_abs_boundary_logmass_diff": worst_bm,
        "where": where,
    }


def _verify_alignment_caches(store: TeacherStore | None) -> tuple[list[str], list[str]]:
    """Problems and report lines of every alignment cache under the store's `alignments/`."""
    from alm.store.alignments import cache_dir, list_cache_keys, verify_cache

    if store is None:
        return [], []  # verify_store reports the store itself
    problems: list[str] = []
    lines: list[str] = []
    for key in list_cache_keys(store):
        found, counts = verify_cache(store, key)
        problems.extend(found)
        if not found:
            lines.append(
                f"  alignment cache {cache_dir(key)}: {counts['num_shards']} shard(s), "
                f"{counts['num_sequences']} sequences: every file matches its checksum, every sequence is "
                "well formed"
            )
    return problems, lines


def run_verify(path_or_url: str | os.PathLike[str], *, deep: bool = False) -> str:
    """The `alm verify` command: check the store; with `deep`, also re-score a sample with the teacher.

    Returns:
        The report to print when the store is sound.

    Raises:
        StoreCorruptError: a file or value is wrong; the message names the first bad shard, sequence and field
            and lists the others.
        StoreError: there is no finished store at that path.
    """
    from alm.store.reader import open_store

    store = retokenize = deep_sample = None
    with contextlib.suppress(StoreCorruptError):  # verify_store reports it
        store = open_store(
            path_or_url
        )  # once: every file is read once (the shards by the verify pass)
    if store is not None:
        try:
            retokenize = _Retokenizer(store)
        except StoreCorruptError:
            pass  # verify_store reports it
        except AlmError as err:
            logger.warning("not re-tokenizing the stored text: %s", err)
        if deep:
            deep_sample = _DeepSample(store)
    checks: list[Callable[[TeacherStore, ShardData], list[str]]] = [
        c for c in (retokenize, deep_sample) if c is not None
    ]
    report: VerifyReport = verify_store(
        store if store is not None else path_or_url,
        values=True,
        on_shard=shard_progress("verify"),
        on_values=(lambda s, shard: [p for check in checks for p in check(s, shard)])
        if checks
        else None,
    )
    cache_problems, cache_lines = _verify_alignment_caches(store)
    if not report.ok or cache_problems:
        text = report.summary() if not report.ok else ""
        if cache_problems:
            listed = "\n".join(f"  - {p}" for p in cache_problems[:20])
            more = (
                f"\n  ... and {len(cache_problems) - 20} more" if len(cache_problems) > 20 else ""
            )
            text = (text + "\n" if text else "") + (
                f"{path_or_url}: alignment cache problems (training on this store is not affected when "
                f"stores[].alignments is off; rebuild a cache with `alm align ... --overwrite`):\n{listed}{more}"
            )
        raise StoreCorruptError(text)
    lines = [report.summary(), *cache_lines]
    if retokenize is not None:
        lines.append("  every untruncated sequence re-tokenizes to its stored teacher ids")
    if deep and store is not None and deep_sample is not None:
        figures = deep_rescore(store, sequences=deep_sample.sequences)
        lines.append(
            f"  --deep: re-scored {figures['num_sequences']} sequences ({figures['num_tokens']} tokens) with the "
            f"teacher: largest |logp difference| {figures['max_abs_logp_diff']:.3g} nats ({figures['where']}), "
            f"largest |boundary_logmass difference| {figures['max_abs_boundary_logmass_diff']:.3g} nats"
        )
    return "\n".join(lines)
