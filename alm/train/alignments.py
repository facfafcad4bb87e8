"""Alignment caches in stage two: `alm align` builds them, `alm train` reuses a matching one, `alm inspect
--student` reports chunk statistics from them (docs/store.md "Alignment caches", ALM_SPEC §4-§5).

A cache holds, per stored sequence, exactly what `StudentExampleBuilder` computes (student ids, SFT mask, greedy
chunks, γ-merged groups with their debiased teacher log-probs); `example_from_record` turns a cached record back
into the same `StudentExample` bit for bit. Whether a cache may stand in for on-the-fly alignment is decided by one
fingerprint over every setting that changes the result (`alignment_settings`): the student tokenizer (its id->bytes
table and its full `tokenizers` definition: normalizer, pre-tokenizer, model, added tokens), the template family,
the student max length, γ, the boundary classes, debiasing, the alignment code version, and the store's plan and
teacher tokenizer (`alm.store.alignments.full_settings`); each cache shard also records the store shard it was
built from. The format itself lives in `alm.store.alignments`.

Policy in `alm train` (`stores[].alignments`): `auto` uses a matching cache and otherwise aligns on the fly with
one log line saying why; `required` refuses a missing or stale cache (`StoreMismatchError`, exit 2); `off` never
reads one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from alm.align import Chunks
from alm.align.targets import AlmTargets, combine_boundary_classes
from alm.config.train import StoreRef, StudentConfig, TrainRecipe, TransferConfig
from alm.errors import ConfigError, StoreCorruptError, StoreError, StoreMismatchError
from alm.store import alignments as cache_format
from alm.store.alignments import AlignedSequence, AlignmentCache, CacheShard
from alm.store.fingerprint import json_fingerprint
from alm.store.reader import StoredSequence, TeacherStore, open_store
from alm.train.batch import StudentExample, StudentExampleBuilder
from alm.vocab import Vocab

logger = logging.getLogger(__name__)

# Bump when alignment (alm.align.chunks), target building (alm.align.targets), rendering or the SFT mask change
# what they compute: caches written before then are stale.
ALIGNMENT_VERSION = 1
_INT = np.int64


def student_tokenizer_fingerprint(tokenizer: Any, vocab: Vocab) -> str:
    """sha256 hex over the student tokenizer's id->bytes table (`Vocab.fingerprint`) and its whole `tokenizers`
    definition (canonical JSON of `backend_tokenizer.to_str()`) and chat template: two tokenizers with the same
    fingerprint tokenize every text the same way."""
    h = hashlib.sha256(b"alm-student-tokenizer/1\0")
    h.update(vocab.fingerprint().encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = (
        json_fingerprint(json.loads(backend.to_str()))
        if backend is not None
        else type(tokenizer).__name__
    )
    h.update(definition.encode() + b"\0")
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def alignment_settings(builder: StudentExampleBuilder) -> dict[str, Any]:
    """Every setting of `builder` that changes its targets (the store's identity is added by the cache)."""
    return {
        "alignment_version": ALIGNMENT_VERSION,
        "student_tokenizer_fingerprint": student_tokenizer_fingerprint(
            builder.student_tokenizer, builder.student_vocab
        ),
        "student_vocab_fingerprint": builder.student_vocab.fingerprint(),
        "student_family": builder.student_family,
        "student_max_length": int(builder.max_length),
        "gamma": float(builder.gamma),
        "boundary_class_ids": [int(c) for c in builder.boundary_class_ids],
        "debias": bool(builder.debias),
        "drop_unterminated_groups": True,
    }


def cache_key_of(builder: StudentExampleBuilder) -> str:
    return cache_format.cache_key(
        student_tokenizer_fingerprint(builder.student_tokenizer, builder.student_vocab)
    )


def record_from_example(
    seq: StoredSequence, example: StudentExample, chunks: Chunks, boundary_class_ids: Iterable[int]
) -> AlignedSequence:
    """What the cache stores for one sequence (`StudentExampleBuilder.build`'s example and chunks)."""
    targets = example.targets
    boundary = combine_boundary_classes(np.asarray(seq.boundary_logmass), tuple(boundary_class_ids))
    return AlignedSequence(
        seq_id=int(seq.seq_id),
        student_token_id=example.input_ids.astype(np.int32),
        student_sft_mask=example.sft_mask,
        chunk_teacher_start=chunks.teacher_start.astype(np.int32),
        chunk_teacher_end=chunks.teacher_end.astype(np.int32),
        chunk_student_start=chunks.student_start.astype(np.int32),
        chunk_student_end=chunks.student_end.astype(np.int32),
        chunk_start_byte=chunks.start_byte.astype(np.int32),
        chunk_end_byte=chunks.end_byte.astype(np.int32),
        chunk_is_block=chunks.is_block,
        chunk_in_loss=chunks.in_loss,
        group_teacher_start=targets.teacher_group_start.astype(np.int32),
        group_teacher_end=targets.teacher_group_end.astype(np.int32),
        group_student_start=targets.student_group_start.astype(np.int32),
        group_student_end=targets.student_group_end.astype(np.int32),
        group_teacher_logp=targets.teacher_group_logp,
        group_boundary_logmass=boundary[targets.teacher_group_last_pos].astype(np.float32),
        group_has_boundary_term=targets.group_has_boundary_term,
    )


def example_from_record(
    record: AlignedSequence, seq: StoredSequence, *, with_hidden: bool
) -> StudentExample:
    """The `StudentExample` the builder would give for `seq`, from its cached record (no tokenization, no
    alignment); the hidden states, if asked for, come from the stored sequence as in the builder."""
    teacher_group_end = record.group_teacher_end.astype(_INT)
    student_group_end = record.group_student_end.astype(_INT)
    targets = AlmTargets(
        teacher_group_logp=record.group_teacher_logp.astype(np.float32, copy=False),
        teacher_group_start=record.group_teacher_start.astype(_INT),
        teacher_group_end=teacher_group_end,
        student_group_start=record.group_student_start.astype(_INT),
        student_group_end=student_group_end,
        teacher_group_last_pos=teacher_group_end - 1,
        student_group_last_pos=student_group_end - 1,
        teacher_chunk_last_pos=record.chunk_teacher_end.astype(_INT) - 1,
        student_chunk_last_pos=record.chunk_student_end.astype(_INT) - 1,
        group_has_boundary_term=record.group_has_boundary_term.astype(bool, copy=False),
    )
    hidden_teacher = None
    if with_hidden:
        hidden = seq.hidden_float32()
        if hidden is None:
            raise StoreError(
                f"stored sequence {seq.seq_id} has no `hidden` field, which loss.hidden needs"
            )
        hidden_teacher = hidden[targets.teacher_chunk_last_pos]
    return StudentExample(
        input_ids=record.student_token_id.astype(_INT),
        sft_mask=record.student_sft_mask.astype(bool, copy=True),
        targets=targets,
        hidden_teacher=hidden_teacher,
    )


class CachedExamples:
    """`StudentExample`s of one store from its alignment cache (picklable: reopened in each DataLoader worker)."""

    def __init__(
        self, store_path: str, key: str, *, with_hidden: bool, max_cached_shards: int = 2
    ) -> None:
        self.store_path = store_path
        self.key = key
        self.with_hidden = with_hidden
        self.max_cached_shards = max_cached_shards
        self._opened: tuple[TeacherStore, AlignmentCache] | None = None
        self._shards: OrderedDict[int, CacheShard] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None, "_shards": OrderedDict()}

    def _open(self) -> tuple[TeacherStore, AlignmentCache]:
        if self._opened is None:
            store = open_store(self.store_path)
            cache = cache_format.open_cache(store, self.key)
            if cache is None:
                raise StoreError(
                    f"{self.store_path}: alignment cache {self.key} disappeared during training"
                )
            self._opened = (store, cache)
        return self._opened

    def shard(self, shard_index: int) -> CacheShard:
        if shard_index not in self._shards:
            store, cache = self._open()
            self._shards[shard_index] = cache.read_shard(store, shard_index)
            while len(self._shards) > self.max_cached_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard_index)
        return self._shards[shard_index]

    def example(self, shard_index: int, row: int, seq: StoredSequence) -> StudentExample:
        """The example of row `row` of store shard `shard_index` (`seq` is that stored sequence).

        Raises:
            StoreCorruptError: the cached row is another sequence.
        """
        record = self.shard(shard_index).record(row)
        if record.seq_id != seq.seq_id:
            raise StoreCorruptError(
                f"alignment cache {self.store_path}/{cache_format.cache_dir(self.key)}: row {row} of shard "
                f"{shard_index} is sequence {record.seq_id}, the store has {seq.seq_id}; rebuild it with "
                "`alm align --overwrite`"
            )
        return example_from_record(record, seq, with_hidden=self.with_hidden)


def find_cache(
    ref: StoreRef, builder: StudentExampleBuilder, *, with_hidden: bool
) -> CachedExamples | None:
    """The matching alignment cache of a training store under its policy (`ref.alignments`), or None to align
    on the fly (`auto` logs why).

    Raises:
        StoreMismatchError: `alignments: required` and there is no matching cache.
    """
    if ref.alignments == "off":
        return None
    if builder.baseline is not None:
        # the baselines' paired positions and top-k are not part of the cache
        if ref.alignments == "required":
            raise StoreMismatchError(
                f"store {ref.path}: stores[].alignments is `required`, but alignment caches hold ALM targets "
                f"and loss.kind {builder.baseline} aligns on the fly; set alignments: auto or off"
            )
        logger.info(
            "store %s: aligning on the fly (loss %s is not cached)", ref.path, builder.baseline
        )
        return None
    store = open_store(ref.path)
    key = cache_key_of(builder)
    settings = alignment_settings(builder)
    reason: str | None
    try:
        cache = cache_format.open_cache(store, key)
        if cache is None:
            reason = f"no finished cache {cache_format.cache_dir(key)} for this student tokenizer"
        else:
            reason = cache.stale_reason(store, settings)
    except StoreCorruptError as err:
        reason = str(err)
    if reason is None:
        logger.info("store %s: using alignment cache %s", ref.path, cache_format.cache_dir(key))
        return CachedExamples(ref.path, key, with_hidden=with_hidden)
    if ref.alignments == "required":
        raise StoreMismatchError(
            f"store {ref.path}: stores[].alignments is `required` but the alignment cache does not match "
            f"({reason}); build it with `alm align {ref.path} --recipe RECIPE` (add --overwrite to replace a "
            "stale one) or set alignments: auto"
        )
    logger.info("store %s: aligning on the fly (%s)", ref.path, reason)
    return None


# --------------------------------------------------------------------------------------------------------------
# Building caches (`alm align`, `alm precompute --students`)


@dataclass(frozen=True)
class AlignSummary:
    url: str
    num_shards_written: int
    num_shards_kept: int
    manifest: dict[str, Any]

    def text(self) -> str:
        totals = self.manifest["totals"]
        settings = self.manifest["settings"]
        return (
            f"alignment cache {self.url}: {totals['num_sequences']} sequences, {totals['num_chunks']} chunks, "
            f"{totals['num_groups']} groups, {totals['num_student_tokens']} student tokens "
            f"({self.num_shards_written} shard(s) written, {self.num_shards_kept} kept); student tokenizer "
            f"{settings['student_tokenizer_fingerprint'][:16]}, family {settings['student_family']}, "
            f"max_length {settings['student_max_length']}, gamma {settings['gamma']}"
        )


# `alm align` builds this many sequences at once (`StudentExampleBuilder.build_many`): a micro-batch's worth.
_ALIGN_GROUP = 32


def write_alignments(
    store_path: str,
    builder: StudentExampleBuilder,
    *,
    overwrite: bool = False,
    on_shard: Callable[[int, int], None] | None = None,
) -> AlignSummary:
    """Align every sequence of a finished store with `builder` and write `alignments/<key>/` (resumable: done
    shards are kept; the manifest is written last).

    Raises:
        StoreError, StoreMismatchError: an unfinished store, or a cache with other settings without `overwrite`.
    """
    store = open_store(store_path)
    key = cache_key_of(builder)
    cache = cache_format.prepare_cache(store, key, alignment_settings(builder), overwrite=overwrite)
    written = kept = 0
    for done, j in enumerate(store.shard_indices, start=1):
        if cache_format.shard_is_done(cache, store, j):
            kept += 1
        else:
            shard = store.read_shard(j, ["token_id", "logp", "boundary_logmass"])
            records = []
            sequences = list(shard.sequences())
            for first in range(0, len(sequences), _ALIGN_GROUP):  # several at once (`build_many`)
                group = sequences[first : first + _ALIGN_GROUP]
                for seq, (example, chunks) in zip(group, builder.build_many(group), strict=True):
                    records.append(
                        record_from_example(seq, example, chunks, builder.boundary_class_ids)
                    )
            cache_format.write_cache_shard(cache, store, j, records)
            written += 1
        if on_shard is not None:
            on_shard(done, len(store.shard_indices))
    manifest = cache_format.finalize_cache(cache, store)
    return AlignSummary(f"{store.url}/{cache.rel}", written, kept, manifest)


def student_config_for(store: TeacherStore, student: str) -> StudentConfig:
    """`--student TOKENIZER` as a student section: a tokenizer id/folder, or `bytes` (the pure byte tokenizer with
    the teacher's special tokens, as `transfer: {tokenizer: bytes}` builds it from the store's tokenizer)."""
    if student == "bytes":
        transfer = TransferConfig.model_validate(
            {"from": store.tokenizer_path, "tokenizer": "bytes"}
        )
        return StudentConfig(transfer=transfer)
    return StudentConfig(model=student)


def builder_for(
    store: TeacherStore,
    *,
    student: str | None = None,
    recipe: str | None = None,
    max_length: int | None = None,
) -> StudentExampleBuilder:
    """The builder `alm train` would use: from a training recipe (its student and loss sections), or from a
    student tokenizer with the recipe defaults (γ 0.1, the default boundary set, debiasing, `max_length` or 512).

    Raises:
        ConfigError: neither or both of `student` and `recipe`, or `max_length` with a recipe.
    """
    from alm.config import load_yaml_model
    from alm.config.train import LossConfig

    if (student is None) == (recipe is None):
        raise ConfigError("give exactly one of --student TOKENIZER or --recipe TRAIN_RECIPE")
    if recipe is not None:
        if max_length is not None:
            raise ConfigError(
                "--max-length goes with --student; with --recipe the recipe's student.max_length is used "
                "(change it with the recipe)"
            )
        cfg = load_yaml_model(TrainRecipe, recipe, [])
        if cfg.loss.baseline() is not None:
            raise ConfigError(
                f"{recipe}: loss.kind {cfg.loss.kind} aligns on the fly (alignment caches hold ALM targets); "
                "give a recipe with loss.kind alm, sft or alm+sft"
            )
        return recipe_builder(store, cfg)
    else:
        assert student is not None
        student_cfg = student_config_for(store, student)
        if max_length is not None:
            if max_length < 2:
                raise ConfigError(f"--max-length {max_length}: must be at least 2")
            student_cfg = student_cfg.model_copy(update={"max_length": max_length})
    return _builder(store, student_cfg, LossConfig())


def recipe_builder(store: TeacherStore, cfg: TrainRecipe) -> StudentExampleBuilder:
    """The builder `alm train cfg` uses for its ALM targets, from the student tokenizer alone (no model loads)."""
    return _builder(store, cfg.student, cfg.loss)


def _builder(store: TeacherStore, student_cfg: StudentConfig, loss: Any) -> StudentExampleBuilder:
    from alm.train.student import load_student_tokenizer

    teacher_model = store.manifest.teacher_model
    student_tokenizer = load_student_tokenizer(student_cfg, teacher_model=teacher_model)
    return StudentExampleBuilder(
        teacher_vocab=store.vocab,
        student_tokenizer=student_tokenizer.tokenizer,
        student_vocab=student_tokenizer.vocab,
        student_family=student_tokenizer.family,
        max_length=student_cfg.max_length,
        boundary_class_ids=loss.boundary_class_ids(),
        gamma=loss.gamma,
        debias=loss.debias,
        baseline=loss.baseline(),
    )


def check_alignment_caches(cfg: TrainRecipe) -> list[str]:
    """Before any model loads: one line per store on whether training will read its alignment cache.

    Raises:
        StoreMismatchError: a store with `alignments: required` has no matching cache.
    """
    lines, to_check = [], []
    for ref in cfg.stores:
        if ref.alignments == "off":
            lines.append(f"store {ref.path}: alignment cache off")
        elif ref.alignments == "auto" and not cache_format.list_cache_keys(open_store(ref.path)):
            lines.append(f"store {ref.path}: no alignment caches, aligned on the fly")
        else:
            to_check.append(ref)
    if not to_check:
        return lines
    builder = recipe_builder(open_store(to_check[0].path), cfg)
    for ref in to_check:
        found = find_cache(ref, builder, with_hidden=False)
        state = "aligned on the fly" if found is None else "alignment cache used"
        lines.append(f"store {ref.path}: {state} ({ref.alignments})")
    return lines


def run_align(
    store_path: str,
    *,
    student: str | None = None,
    recipe: str | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
) -> str:
    """The `alm align` command. Returns the summary to print."""
    from alm.store.verify import shard_progress

    if (student is None) == (recipe is None):
        raise ConfigError("give exactly one of --student TOKENIZER or --recipe TRAIN_RECIPE")
    builder = builder_for(
        open_store(store_path), student=student, recipe=recipe, max_length=max_length
    )
    summary = write_alignments(
        store_path, builder, overwrite=overwrite, on_shard=shard_progress(f"align {store_path}")
    )
    return summary.text()


# --------------------------------------------------------------------------------------------------------------
# Chunk statistics (`alm inspect STORE --student TOKENIZER`)

CHUNK_BYTE_BINS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (1, 1),
    (2, 2),
    (3, 3),
    (4, 4),
    (5, 8),
    (9, 16),
    (17, 32),
    (33, 64),
    (65, 2**62),
)


def chunk_statistics(records: Iterable[AlignedSequence], num_text_bytes: int) -> dict[str, Any]:
    """Chunk and group figures over cached (or freshly aligned) sequences.

    Returns:
        `num_sequences`, `chunks_per_sequence` / `groups_per_sequence` (mean, min, max; chunks: in the loss
        region), `num_chunks`, `num_chunks_in_loss`, `num_groups`, `bytes_covered` (in-loss chunk bytes / text
        bytes), `chunks_per_group` (mean), `chunk_bytes_histogram` ([(lo, hi, count)] over in-loss chunks: 0 =
        template-block chunks), `teacher_tokens_per_chunk`, `student_tokens_per_chunk` (means).
    """
    chunks_per_seq, groups_per_seq = [], []
    lengths, teacher_tokens, student_tokens = [], [], []
    covered = 0
    for record in records:
        loss = record.chunk_in_loss
        chunks_per_seq.append(int(loss.sum()))
        groups_per_seq.append(record.num_groups)
        length = (record.chunk_end_byte - record.chunk_start_byte)[loss]
        lengths.append(length)
        covered += int(length.sum())
        teacher_tokens.append((record.chunk_teacher_end - record.chunk_teacher_start)[loss])
        student_tokens.append((record.chunk_student_end - record.chunk_student_start)[loss])
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)

    def spread(values: list[int]) -> dict[str, float]:
        arr = np.asarray(values, dtype=np.float64)
        if not len(arr):
            return {"mean": 0.0, "min": 0.0, "max": 0.0}
        return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}

    def mean(parts: list[np.ndarray]) -> float:
        values = np.concatenate(parts) if parts else np.zeros(0)
        return float(values.mean()) if len(values) else 0.0

    num_chunks_in_loss, num_groups = int(sum(chunks_per_seq)), int(sum(groups_per_seq))
    return {
        "num_sequences": len(chunks_per_seq),
        "num_chunks_in_loss": num_chunks_in_loss,
        "num_groups": num_groups,
        "chunks_per_sequence": spread(chunks_per_seq),
        "groups_per_sequence": spread(groups_per_seq),
        "chunks_per_group": num_chunks_in_loss / num_groups if num_groups else 0.0,
        "bytes_covered": covered / num_text_bytes if num_text_bytes else 0.0,
        "num_text_bytes": num_text_bytes,
        "chunk_bytes_histogram": [
            (lo, hi, int(((all_lengths >= lo) & (all_lengths <= hi)).sum()))
            for lo, hi in CHUNK_BYTE_BINS
        ],
        "teacher_tokens_per_chunk": mean(teacher_tokens),
        "student_tokens_per_chunk": mean(student_tokens),
    }


def _aligned_records(
    store: TeacherStore, builder: StudentExampleBuilder
) -> Iterator[AlignedSequence]:
    for j in store.shard_indices:
        shard = store.read_shard(j, ["token_id", "logp", "boundary_logmass"])
        for seq in shard.sequences():
            example, chunks = builder.build(seq)
            yield record_from_example(seq, example, chunks, builder.boundary_class_ids)


def inspect_student(
    store_path: str, *, student: str | None = None, recipe: str | None = None
) -> tuple[dict[str, Any], str]:
    """Chunk statistics of a store against a student (from its matching cache, else aligned on the fly), and
    where they came from."""
    store = open_store(store_path)
    builder = builder_for(store, student=student, recipe=recipe)
    key = cache_key_of(builder)
    cache = cache_format.open_cache(store, key)
    num_text_bytes = int(store.manifest.num_text_bytes)
    if cache is not None and cache.stale_reason(store, alignment_settings(builder)) is None:
        records: Iterable[AlignedSequence] = (
            r for j in store.shard_indices for r in cache.read_shard(store, j).records()
        )
        source = f"alignment cache {cache_format.cache_dir(key)}"
    else:
        records = _aligned_records(store, builder)
        source = "aligned now (no matching alignment cache; `alm align` writes one)"
    stats = chunk_statistics(records, num_text_bytes)
    stats["settings"] = alignment_settings(builder)
    return stats, source


def inspect_student_text(store_path: str, student: str) -> str:
    """The `alm inspect STORE --student TOKENIZER` report."""
    stats, source = inspect_student(store_path, student=student)
    settings = stats["settings"]

    def spread(name: str) -> str:
        s = stats[name]
        return f"mean {s['mean']:.1f}, min {s['min']:.0f}, max {s['max']:.0f}"

    lines = [
        f"chunk statistics of {store_path} against student {student} ({source}):",
        f"  student tokenizer {settings['student_tokenizer_fingerprint'][:16]}, family "
        f"{settings['student_family']}, max_length {settings['student_max_length']}, gamma {settings['gamma']}",
        f"  sequences: {stats['num_sequences']}",
        f"  chunks per sequence (in the loss): {spread('chunks_per_sequence')}",
        f"  groups per sequence (after gamma-merging): {spread('groups_per_sequence')}; "
        f"{stats['chunks_per_group']:.2f} chunks per group",
        f"  bytes covered by chunks: {stats['bytes_covered']:.1%} of {stats['num_text_bytes']} text bytes",
        f"  tokens per chunk: teacher {stats['teacher_tokens_per_chunk']:.2f}, "
        f"student {stats['student_tokens_per_chunk']:.2f}",
        "  chunk length histogram (bytes: chunks; 0 = template blocks):",
    ]
    total = max(1, stats["num_chunks_in_loss"])
    for lo, hi, count in stats["chunk_bytes_histogram"]:
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 2**62 else f"{lo}+")
        lines.append(f"    {label:>6}: {count:8d}  {count / total:6.1%}")
    return "\n".join(lines)
