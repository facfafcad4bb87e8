"""Stage one: `alm precompute RECIPE` — documents -> teacher backend -> teacher store (DESIGN.md "Stage one").

    alm precompute stages/demo_precompute.yaml                      # CPU (or one GPU when present)
    alm precompute stages/x.yaml --shard 2/8                         # worker 2 of 8 (Slurm array, one per GPU)
    alm precompute stages/x.yaml --set teacher.backend=vllm          # vLLM on GPU machines

Everything is loaded and checked before the teacher model: the recipe, the data spec and its documents, the teacher
tokenizer (refused if it cannot reproduce exact bytes), the output folder (a foreign or different store is refused
without `--overwrite`). Then:

- documents are enumerated deterministically (empty ones skipped, `data.limit` applied) and cut into fixed-size
  shards: global shard j holds documents [j*S, (j+1)*S) with `seq_id` = document index;
- worker i of N writes the shards j with j % N == i, so the store is the same whatever N is;
- finished shards are skipped (resume after a kill: the store's shard writer commits a shard by renaming it, so a
  killed worker leaves only a temp folder that the next run discards); batches are formed inside one shard
  (`plan_batches`), so a resumed shard sees exactly the same batches as an uninterrupted one;
- the worker that sees every shard committed writes the manifest (atomic), otherwise `alm store finalize` does.

Implements ALM_SPEC.md §10.1-§10.3 (what the teacher must store). Imports `alm.teacher`, `alm.data`, `alm.store`,
`alm.templates`, `alm.vocab`, `alm.config`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alm.config.precompute import PrecomputeRecipe, load_precompute_recipe
from alm.errors import ConfigError, DataError, TokenizerRefusedError
from alm.store.finalize import try_finalize
from alm.store.writer import (
    ShardClaim,
    ShardWriter,
    StoreLayout,
    StorePlan,
    float32_to_bfloat16_bits,
    prepare_store,
)
from alm.teacher.base import TeacherBackend, TeacherScores, plan_batches
from alm.templates import Document, TokenizedSequence, render, resolve_family

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """`--shard i/N`: this worker's index and the number of workers."""

    worker: int
    num_workers: int

    def owns(self, shard_index: int) -> bool:
        return shard_index % self.num_workers == self.worker


def parse_shard(shard: str) -> ShardSpec:
    """Parse `i/N` (0-based worker i of N workers).

    Raises:
        ConfigError: not of the form i/N with 0 <= i < N.
    """
    head, sep, tail = str(shard).partition("/")
    try:
        worker, num_workers = int(head), int(tail)
    except ValueError:
        worker, num_workers = -1, 0
    if not sep or num_workers < 1 or not 0 <= worker < num_workers:
        raise ConfigError(
            f"--shard {shard!r}: expected i/N with 0 <= i < N, e.g. --shard 0/4 for the first of 4"
        )
    return ShardSpec(worker, num_workers)


def is_empty_document(document: Document) -> bool:
    """A document with no content (only template blocks, or text that is all whitespace) is skipped."""
    from alm.data.specs import is_empty

    return is_empty(document)


# ---------------------------------------------------------------------------------------------------------------
# Data


def _resolve_spec_path(spec: str, recipe_path: Path) -> str:
    """A relative spec path is looked up in the working directory, then next to the recipe and one folder up;
    anything else (e.g. a shipped spec name like `stdlib_docs`) is handed to `load_data_spec` as given."""
    if Path(spec).is_absolute() or Path(spec).is_file():
        return spec
    for candidate in (recipe_path.parent / spec, recipe_path.parent.parent / spec):
        if candidate.is_file():
            return str(candidate)
    return spec


@dataclass
class SelectedDocuments:
    """The recipe's documents, counted in full but kept only for the shards a worker writes.

    Attributes:
        num_documents: documents selected in total (empty ones skipped, `data.limit` applied).
        shards: shard index -> its documents, for the kept shards only (memory is ~1/N of the data per worker).
        spec_name: the data spec's name.
        fingerprint: covers the spec and its source files, the split and the limit.
        has_chat: some source of the spec is `kind: chat` (a teacher's chat template matters only then).
    """

    num_documents: int
    shards: dict[int, list[Document]]
    spec_name: str
    fingerprint: str
    has_chat: bool = True


def load_documents(
    recipe: PrecomputeRecipe, recipe_path: Path, keep_shard: Callable[[int], bool] | None = None
) -> SelectedDocuments:
    """Enumerate the recipe's documents in order (empty ones skipped, then `data.limit`), in one pass.

    Args:
        recipe: the precompute recipe.
        recipe_path: its file (relative data-spec paths are also looked up next to it).
        keep_shard: which shards' documents to keep (default: all); the others are only counted.

    Raises:
        ConfigError: the data spec is missing or invalid.
        DataError: a data file is missing or unreadable (invalid UTF-8, bad JSON), or no non-empty document is left.
    """
    from alm.data.specs import DocumentStats, data_fingerprint, iter_documents, load_data_spec

    if isinstance(recipe.data.spec, str):
        spec = load_data_spec(
            _resolve_spec_path(recipe.data.spec, recipe_path), recipe.data.spec_overrides
        )
    else:
        spec = load_data_spec(dict(recipe.data.spec), source=f"{recipe_path}: data.spec")
    shards: dict[int, list[Document]] = {}
    num_documents = 0
    stats = DocumentStats()
    documents = iter_documents(
        spec,
        split=recipe.data.split,
        stats=stats,
        skip_invalid=recipe.skip_untokenizable,
        interleave=recipe.data.limit is not None,  # a limit reads every source, not only the first
    )
    for document in documents:
        if is_empty_document(document):
            stats.num_empty += 1
            continue
        shard_index = num_documents // recipe.shard_size
        if keep_shard is None or keep_shard(shard_index):
            shards.setdefault(shard_index, []).append(document)
        num_documents += 1
        if recipe.data.limit is not None and num_documents >= recipe.data.limit:
            break
    if not num_documents:
        split = recipe.data.split or spec.split
        raise DataError(
            f"data spec {spec.name!r} (split {split}) gives no non-empty document"
            f"{f' ({stats.num_empty} empty ones skipped)' if stats.num_empty else ''}; check its sources and "
            "split, there is nothing for the teacher to score"
        )
    fingerprint = data_fingerprint(spec, split=recipe.data.split, limit=recipe.data.limit)
    has_chat = any(source.kind == "chat" for source in spec.sources)
    return SelectedDocuments(num_documents, shards, spec.name, fingerprint, has_chat)


# ---------------------------------------------------------------------------------------------------------------
# Teacher


def load_teacher(
    recipe: PrecomputeRecipe, model_path: str, boundary_class: np.ndarray
) -> TeacherBackend:
    """The recipe's backend, with its model loaded (the expensive step, done last)."""
    teacher = recipe.teacher
    if teacher.backend == "vllm":
        from alm.teacher.vllm import VLLMTeacher

        options = teacher.vllm
        return VLLMTeacher(
            model_path,
            boundary_class,
            model_id=teacher.model,
            revision=teacher.revision,
            dtype=teacher.dtype,
            top_k=recipe.top_k,
            hidden_states=recipe.hidden_states,
            max_model_len=recipe.max_length + 2,
            tensor_parallel_size=options.tensor_parallel_size,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_num_batched_tokens=options.max_num_batched_tokens,
            max_num_seqs=options.max_num_seqs,
            num_logprobs=options.num_logprobs,
            boundary_method=options.boundary_method,
            enforce_eager=options.enforce_eager,
            seed=options.seed,
            token_ids_memory_gib=options.token_ids_memory_gib,
            batch_invariant=options.batch_invariant,
        )
    from alm.teacher.hf import HFTeacher

    return HFTeacher(
        model_path,
        boundary_class,
        model_id=teacher.model,
        revision=teacher.revision,
        dtype=teacher.dtype,
        device=teacher.device,
        top_k=recipe.top_k,
        hidden_states=recipe.hidden_states,
        token_budget=recipe.token_budget,
        row_chunk=recipe.row_chunk,
    )


def _backend_settings(recipe: PrecomputeRecipe, model_path: str) -> tuple[str, str]:
    """(weights dtype as resolved on this machine, boundary method) without loading the model."""
    teacher = recipe.teacher
    if teacher.backend == "vllm":
        from alm.teacher.vllm import read_model_config, resolve_vllm_dtype

        dtype = resolve_vllm_dtype(teacher.dtype, read_model_config(model_path, teacher.revision))
        return dtype, teacher.vllm.boundary_method
    from alm.teacher.hf import resolve_device, resolve_dtype

    dtype = resolve_dtype(teacher.dtype, resolve_device(teacher.device))
    return str(dtype).removeprefix("torch."), "exact"


# ---------------------------------------------------------------------------------------------------------------
# The run


def _render_shard(
    documents: list[Document],
    tokenizer: Any,
    vocab: Any,
    family: str,
    max_length: int,
    *,
    skip_untokenizable: bool,
) -> tuple[list[TokenizedSequence], list[str]]:
    """Render a shard's documents with the teacher tokenizer.

    Returns:
        The sequences, and the ids of documents skipped as untokenizable (only with `skip_untokenizable`).

    Raises:
        TokenizerRefusedError: a document cannot be encoded byte-exactly and `skip_untokenizable` is off.
    """
    sequences, skipped = [], []
    for document in documents:
        try:
            seq = render(document, tokenizer, vocab, family, max_length=max_length)
        except TokenizerRefusedError as err:
            if skip_untokenizable:
                skipped.append(f"{document.doc_id}: {err}")
                continue
            raise TokenizerRefusedError(
                f"document {document.doc_id!r} (source {document.source}, row {document.row}): {err}\n"
                "Fix or drop that document, or skip such documents with --set skip_untokenizable=true "
                "(each one is logged and counted)."
            ) from None
        if seq.num_tokens == 0:
            raise DataError(
                f"document {document.doc_id!r} renders to no teacher tokens; this should not happen for a "
                "non-empty document, please report it"
            )
        sequences.append(seq)
    return sequences, skipped


def _check_shards(
    shards: dict[int, list[Document]],
    tokenizer: Any,
    vocab: Any,
    family: str,
    max_length: int,
    *,
    skip_untokenizable: bool,
) -> dict[int, int]:
    """Render every document of this worker's shards once before the model loads (and before anything is
    written), so that a document the tokenizer cannot encode stops the run at once. The sequences are not
    kept (shards are rendered again as they are scored, which keeps memory at the size of the text).

    Returns:
        shard index -> number of teacher tokens it will score (for the progress bar).
    """
    tokens_per_shard = {}
    num_skipped = 0
    for j, documents in shards.items():
        sequences, skipped = _render_shard(
            documents, tokenizer, vocab, family, max_length, skip_untokenizable=skip_untokenizable
        )
        for reason in skipped:
            logger.warning("skipping document %s", reason)
        num_skipped += len(skipped)
        tokens_per_shard[j] = sum(seq.num_tokens for seq in sequences)
    if num_skipped:
        logger.warning("skipping %d document(s) the teacher tokenizer cannot encode", num_skipped)
    return tokens_per_shard


def _score_shard(
    teacher: TeacherBackend, sequences: list[TokenizedSequence], token_budget: int, on_batch: Any
) -> Iterator[tuple[int, TeacherScores]]:
    """Score a shard's sequences in token-budget batches (longest first); yields (index in shard, scores)."""
    lengths = [seq.num_tokens for seq in sequences]
    for batch in plan_batches(lengths, token_budget):
        scores = teacher.score([sequences[i].token_id for i in batch])
        on_batch(sum(lengths[i] for i in batch))
        yield from zip(batch, scores, strict=True)


def _write_shard(
    layout: StoreLayout,
    shard_index: int,
    first_seq_id: int,
    sequences: list[TokenizedSequence],
    scores: list[TeacherScores],
    top_k: int,
    hidden: bool,
) -> None:
    with ShardWriter(layout, shard_index) as writer:
        for k, (seq, score) in enumerate(zip(sequences, scores, strict=True)):
            writer.add(
                seq_id=first_seq_id + k,
                text=seq.text,
                token_id=seq.token_id.astype(np.int32),
                logp=score.logp,
                boundary_logmass=score.boundary_logmass,
                segments=seq.segments,
                loss_spans=seq.loss_spans,
                truncated=seq.truncated,
                doc_id=seq.doc_id,
                source=seq.source,
                row=seq.row,
                # a missing top-k (None) is refused by the writer when the store has the field
                topk_id=score.topk_id[:, :top_k] if top_k and score.topk_id is not None else None,
                topk_logp=score.topk_logp[:, :top_k]
                if top_k and score.topk_logp is not None
                else None,
                hidden=score.hidden if hidden else None,
            )


def _write_tokenizer(layout: StoreLayout, tokenizer: Any) -> None:
    """Save the teacher tokenizer into `vocab/tokenizer/`, file by file and atomically, skipping identical files:
    N workers starting at once (or a worker killed mid-save) never leave a half-written tokenizer file."""
    import tempfile

    from alm.store import schema

    location = layout.location
    with tempfile.TemporaryDirectory(prefix="alm-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(tmp).as_posix()
            data = path.read_bytes()
            if (
                location.exists(schema.TOKENIZER_DIR, rel)
                and location.read_bytes(schema.TOKENIZER_DIR, rel) == data
            ):
                continue
            location.write_bytes(data, schema.TOKENIZER_DIR, rel)


def _compact(score: TeacherScores, hidden_dtype: str) -> TeacherScores:
    """Hidden states in their 16-bit stored encoding right away: a shard's scores stay in memory until it is
    written (the batches run longest first, not in document order)."""
    if score.hidden is None or score.hidden.dtype != np.float32:
        return score
    if hidden_dtype == "bfloat16":
        hidden = float32_to_bfloat16_bits(score.hidden)
    else:
        hidden = score.hidden.astype(np.float16)
    return dataclasses.replace(score, hidden=hidden)


class _Progress:
    """tqdm bar over this worker's share, in teacher tokens (known exactly from the check before the model)."""

    def __init__(self, num_tokens: int, label: str) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # log lines go through tqdm.write, so they never break the bar
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self.bar = tqdm(
            total=num_tokens,
            unit="tok",
            unit_scale=True,
            desc=label,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def update(self, num_tokens: int) -> None:
        self.bar.update(num_tokens)

    def close(self) -> None:
        self.bar.close()
        self._redirect.__exit__(None, None, None)


def _precompute_shard(
    layout: StoreLayout,
    j: int,
    documents: list[Document],
    recipe: PrecomputeRecipe,
    teacher: TeacherBackend,
    tokenizer: Any,
    vocab: Any,
    family: str,
    on_batch: Any,
) -> int:
    """Render, score and write shard j (the caller holds its claim); return its number of teacher tokens."""
    sequences, _ = _render_shard(
        documents,
        tokenizer,
        vocab,
        family,
        recipe.max_length,
        skip_untokenizable=recipe.skip_untokenizable,
    )
    scores: list[TeacherScores | None] = [None] * len(sequences)
    for k, score in _score_shard(teacher, sequences, recipe.token_budget, on_batch):
        scores[k] = _compact(score, recipe.hidden_dtype)
    scored = [score for score in scores if score is not None]
    assert len(scored) == len(sequences)  # _score_shard scores every sequence
    _write_shard(
        layout, j, j * recipe.shard_size, sequences, scored, recipe.top_k, recipe.hidden_states
    )
    return sum(seq.num_tokens for seq in sequences)


def run_precompute(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    shard: str = "0/1",
    overwrite: bool = False,
    stats: dict[str, float] | None = None,
) -> str:
    """Run the teacher over the recipe's data and write (this worker's part of) the teacher store.

    Args:
        recipe_path: precompute recipe YAML (`stages/*precompute*.yaml`).
        overrides: `key.sub=value` strings (`--set`).
        shard: `i/N`: this worker is i of N; it writes shards j with j % N == i.
        overwrite: replace an alm store in the output folder that was made with other settings.
        stats: if given, filled with this worker's `num_tokens`, `seconds` and `cpu_seconds` spent rendering,
            scoring and writing (model loading excluded), for benchmarks.

    Returns:
        A one-paragraph summary: where the store is, what this worker wrote, totals when finished.

    Raises:
        ConfigError, DataError, TokenizerRefusedError, StoreError, BackendUnavailableError: user mistakes, each
            with the value at fault and the fix; nothing that looks like a finished store is left behind.
    """
    from alm.teacher.default import resolve_teacher_path
    from alm.teacher.hf import describe_model, load_tokenizer
    from alm.vocab import vocab_from_tokenizer

    recipe_path = Path(recipe_path)
    recipe = load_precompute_recipe(recipe_path, overrides)
    if recipe.threads is not None:
        import torch

        torch.set_num_threads(recipe.threads)
    worker = parse_shard(shard)
    selected = load_documents(recipe, recipe_path, keep_shard=worker.owns)
    model_path = resolve_teacher_path(recipe.teacher.model)
    tokenizer = load_tokenizer(model_path, recipe.teacher.revision)
    vocab = vocab_from_tokenizer(tokenizer, name=recipe.teacher.model)
    # `auto` renders chat with the teacher's own template when it has a usable one; plain-text data renders the
    # same either way, so its stores keep the detected family's name (and plan) as before
    family = resolve_family(recipe.teacher.family, tokenizer, chat=selected.has_chat)
    model_info = describe_model(model_path, recipe.teacher.revision)
    dtype_name, boundary_method = _backend_settings(recipe, model_path)

    check_started, check_started_cpu = time.perf_counter(), time.process_time()
    tokens_per_shard = _check_shards(
        selected.shards,
        tokenizer,
        vocab,
        family,
        recipe.max_length,
        skip_untokenizable=recipe.skip_untokenizable,
    )
    check_seconds = time.perf_counter() - check_started
    check_cpu_seconds = time.process_time() - check_started_cpu

    shard_size = recipe.shard_size
    num_shards = math.ceil(selected.num_documents / shard_size)
    fields = ["token_id", "logp", "boundary_logmass"]
    if recipe.top_k:
        fields += ["topk_id", "topk_logp"]
    if recipe.hidden_states:
        fields.append("hidden")
    plan = StorePlan(
        teacher_model=recipe.teacher.model,
        tokenizer_fingerprint=vocab.fingerprint(),
        data_spec_name=selected.spec_name,
        data_spec_fingerprint=selected.fingerprint,
        num_shards=num_shards,
        max_length=recipe.max_length,
        fields=tuple(fields),
        top_k=recipe.top_k,
        hidden_size=int(model_info["hidden_size"]) if recipe.hidden_states else 0,
        hidden_encoding=recipe.hidden_dtype,
        precision=recipe.precision,
        compression=recipe.compression,
        teacher_revision=str(model_info["revision"]) or None,
        teacher_config_hash=str(model_info["config_hash"]),
        backend=recipe.teacher.backend,
        boundary_method=boundary_method,
        boundary_top_k=recipe.teacher.vllm.num_logprobs
        if boundary_method.startswith("topk")
        else 0,
        settings={
            "family": family,
            "shard_size": shard_size,
            "token_budget": recipe.token_budget,
            "teacher_dtype": dtype_name,
            "split": recipe.data.split,
            "limit": recipe.data.limit,
            "num_documents": selected.num_documents,
            "skip_untokenizable": recipe.skip_untokenizable,
        },
        backend_versions=_versions(),
        command=shlex.join(
            ["alm", "precompute", str(recipe_path)]
            + [a for o in overrides or [] for a in ("--set", o)]
            + ["--shard", shard]
        ),
    )
    layout = prepare_store(recipe.output, plan, overwrite=overwrite)
    layout.write_vocab(vocab)
    _write_tokenizer(layout, tokenizer)

    mine = [j for j in range(num_shards) if worker.owns(j)]
    todo = [j for j in mine if not layout.shard_done(j)]
    if len(todo) < len(mine):
        logger.info(
            "resuming: %d of this worker's %d shard(s) already written",
            len(mine) - len(todo),
            len(mine),
        )
    num_tokens_written = 0
    elapsed = 0.0
    if todo:
        teacher = load_teacher(recipe, model_path, vocab.boundary_class)
        started, started_cpu = time.perf_counter(), time.process_time()
        num_tokens_todo = sum(tokens_per_shard[j] for j in todo)
        progress = _Progress(num_tokens_todo, f"precompute {worker.worker}/{worker.num_workers}")
        try:
            for j in todo:
                with ShardClaim(layout, j):  # before scoring: a second worker on j stops at once
                    if layout.shard_done(j):  # another worker finished it meanwhile
                        continue
                    num_tokens_written += _precompute_shard(
                        layout,
                        j,
                        selected.shards.pop(j),
                        recipe,
                        teacher,
                        tokenizer,
                        vocab,
                        family,
                        progress.update,
                    )
        finally:
            progress.close()
        elapsed = time.perf_counter() - started
        if stats is not None:
            # the tokenizer check before the model loads counts as precompute work too
            stats.update(
                num_tokens=num_tokens_written,
                seconds=elapsed + check_seconds,
                cpu_seconds=time.process_time() - started_cpu + check_cpu_seconds,
            )
    manifest_path = try_finalize(layout)
    wrote = (
        f"worker {worker.worker}/{worker.num_workers} wrote {len(todo)} shard(s), {num_tokens_written} teacher tokens "
        f"in {elapsed:.1f} s ({num_tokens_written / max(elapsed, 1e-9):.0f} tokens/s)"
        if todo
        else f"worker {worker.worker}/{worker.num_workers}: all of its {len(mine)} shard(s) were already written"
    )
    if manifest_path is None:
        missing = [j for j in range(num_shards) if not layout.shard_done(j)]
        return (
            f"{wrote}. Teacher store {layout.url} is not finished yet: shard(s) {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''} of {num_shards} are still to be written by other workers; the "
            "last worker writes the manifest (or run `alm store finalize` when all are done)."
        )
    from alm.store.reader import read_manifest

    manifest = read_manifest(layout.location)
    assert manifest is not None  # try_finalize wrote it
    num_tokens = manifest.num_tokens
    disk = manifest.num_disk_bytes
    return (
        f"{wrote}.\nTeacher store {layout.url} is finished: {manifest.num_sequences} sequences, {num_tokens} teacher tokens, "
        f"{manifest.num_text_bytes} text bytes in {num_shards} shard(s), "
        f"{disk / max(num_tokens, 1):.1f} bytes/token on disk (arrays and index with the text).\nManifest: {manifest_path}\n"
        f"Inspect it with: alm inspect {layout.url}"
    )


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {}
    for package in ("alm", "torch", "transformers", "tokenizers", "zarr", "pyarrow", "vllm"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
