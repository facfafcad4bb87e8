"""Stage two's data: the training stores, checked and opened once, and the micro-batch stream over them
(DESIGN.md stage two). Deterministic and resumable.

Owns `TrainingStores` / `check_stores` (fingerprints and fields, before any model loads), the sequence order,
sharding across ranks, worker processes and the data position:

- **Order.** For each epoch e, the shards of all stores are visited in a permuted order and the rows of each shard
  in a permuted order, both drawn from `numpy.random.default_rng([seed, e, ...])`. So reads are whole-shard
  (each worker keeps the shards it is reading in memory) and shuffling happens in memory.
- **Batches.** The global sequence stream is cut into micro-batches of `micro_batch_size` sequences; micro-batch
  `k` of rank `r` takes stream positions `((k * world_size + r) * B, ... + B)`. With `grad_accum` micro-batches
  per step, optimizer step s uses exactly the same sequences for 1 process x accumulation A*W as for W processes
  x accumulation A.
- **Resume.** Micro-batch k is a pure function of (seed, k), so a run that restarts at step s asks the loader for
  micro-batches from `s * grad_accum` and gets exactly the batches an uninterrupted run would have seen.
- **Workers.** A map-style dataset indexed by micro-batch number, given to `torch.utils.data.DataLoader` with
  `batch_size=None`: workers build the `StudentBatch`es (tokenize, align, ALM targets; `alm.train.batch`) in
  parallel and the DataLoader returns them in index order.

Imports `alm.store` (reader) and `alm.train.batch`; never `torch.distributed` (ranks come in as integers).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alm.config.train import StoreRef, TrainRecipe
from alm.errors import StoreError, StoreMismatchError
from alm.store.reader import TeacherStore, open_store
from alm.train.batch import StudentBatch, StudentExample, StudentExampleBuilder, collate

if TYPE_CHECKING:
    from alm.train.student import StudentTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard of one store, with its number of sequences."""

    store_index: int
    shard_index: int
    num_sequences: int


def _shard_refs(store_index: int, store: TeacherStore) -> list[ShardRef]:
    return [
        ShardRef(store_index, shard.index, shard.num_sequences)
        for shard in store.manifest.shards
        if shard.num_sequences > 0
    ]


def _teacher_fingerprint(store: TeacherStore) -> str:
    """The teacher tokenizer fingerprint the store records (else that of its vocabulary table)."""
    return store.manifest.tokenizer_fingerprint or store.vocab.fingerprint()


@dataclass(frozen=True)
class TrainingStores:
    """The training stores of a recipe, checked and opened once (they share one teacher tokenizer)."""

    paths: tuple[str, ...]
    teacher_vocab: Any
    teacher_model: str | None
    teacher_fingerprint: str
    hidden_size: int
    num_sequences: int
    shards: tuple[ShardRef, ...]


def check_stores(cfg: TrainRecipe) -> TrainingStores:
    """Open every store of the recipe (and its eval store), compare fingerprints with the recipe and with each
    other, check the fields the losses need. No model loads.

    Raises:
        StoreError: a store is missing or unfinished, or lacks a field a loss needs.
        StoreMismatchError: a fingerprint differs from the recipe's, or the stores disagree.
    """
    return open_training_stores(
        cfg.stores,
        hidden_weight=cfg.loss.hidden,
        eval_store=cfg.eval.store if cfg.eval is not None else None,
        topk_loss_kind=cfg.loss.kind if cfg.loss.baseline() is not None else None,
    )


def open_training_stores(
    refs: Sequence[StoreRef],
    *,
    hidden_weight: float = 0.0,
    eval_store: str | None = None,
    topk_loss_kind: str | None = None,
) -> TrainingStores:
    """`check_stores` from its parts: the store references, the hidden-state loss weight, the eval store and the
    loss kind that needs the stored top-k (a baseline; None for ALM and SFT).

    Raises:
        StoreError, StoreMismatchError: as `check_stores`.
    """
    training = [(ref, open_store(ref.path)) for ref in refs]
    first_store = training[0][1]
    first_fingerprint = _teacher_fingerprint(first_store)
    problems: list[str] = []
    shards: list[ShardRef] = []
    for store_index, (ref, store) in enumerate(training):
        fingerprint = _teacher_fingerprint(store)
        expected = ref.teacher_tokenizer_fingerprint
        if expected and expected != fingerprint:
            raise StoreMismatchError(
                f"store {ref.path}: teacher tokenizer fingerprint is {fingerprint}, but "
                f"the recipe expects {expected}; point stores[].path at the right store or update the recipe"
            )
        if ref.data_fingerprint and ref.data_fingerprint != store.manifest.data_spec_fingerprint:
            raise StoreMismatchError(
                f"store {ref.path}: data fingerprint is {store.manifest.data_spec_fingerprint}, but the recipe expects "
                f"{ref.data_fingerprint}; point stores[].path at the right store or update the recipe"
            )
        if fingerprint != first_fingerprint:
            raise StoreMismatchError(
                f"store {ref.path} has teacher tokenizer fingerprint {fingerprint}, but "
                f"{refs[0].path} has {first_fingerprint}; all stores of one run must "
                "come from the same teacher tokenizer"
            )
        if hidden_weight > 0 and "hidden" not in store.fields:
            problems.append(
                f"store {ref.path} has no `hidden` field (it stores {list(store.fields)}) but loss.hidden="
                f"{hidden_weight}; rerun precompute with hidden states or set loss.hidden: 0"
            )
        if topk_loss_kind is not None and not {"topk_id", "topk_logp"} <= set(store.fields):
            problems.append(
                f"store {ref.path} has no `topk_id`/`topk_logp` fields (it stores {list(store.fields)}) but "
                f"loss.kind={topk_loss_kind} trains from the teacher's stored top-k; rerun precompute with "
                "e.g. `top_k: 64` in its recipe (docs/baselines.md), or use loss.kind alm"
            )
        shards.extend(_shard_refs(store_index, store))
    if eval_store is not None:
        eval_fingerprint = _teacher_fingerprint(open_store(eval_store))
        if eval_fingerprint != first_fingerprint:
            raise StoreMismatchError(
                f"store {eval_store} has teacher tokenizer fingerprint "
                f"{eval_fingerprint}, but {refs[0].path} has "
                f"{first_fingerprint}; all stores of one run must come from the same teacher "
                "tokenizer"
            )
    if problems:
        raise StoreError("\n".join(problems))
    return TrainingStores(
        paths=tuple(ref.path for ref in refs),
        teacher_vocab=first_store.vocab,
        teacher_model=first_store.manifest.teacher_model,
        teacher_fingerprint=first_fingerprint,
        hidden_size=first_store.manifest.hidden_size,
        num_sequences=sum(store.num_sequences for _, store in training),
        shards=tuple(shards),
    )


def teacher_hidden_second_moment(store_path: str) -> torch.Tensor:
    """Per-channel mean of the squared teacher hidden state over the first shard: the hidden loss's constant
    normaliser (ALM_SPEC §7.1, §13.14: a dataset constant, not a per-batch value).

    Raises:
        StoreError: the store has no `hidden` field.
    """
    store = open_store(store_path)
    shard = store.read_shard(
        store.shard_indices[0], ["token_id", "logp", "boundary_logmass", "hidden"]
    )
    rows = []
    for seq in shard.sequences():
        hidden = seq.hidden_float32()
        if hidden is None:
            raise StoreError(
                f"store {store_path} has no `hidden` field, which the hidden-state loss needs"
            )
        rows.append(hidden)
    values = np.concatenate(rows)  # [N, d_T]
    return torch.from_numpy(np.square(values.astype(np.float64)).mean(axis=0).astype(np.float32))


class SequenceOrder:
    """The deterministic sequence stream: position -> (shard, row), epoch after epoch."""

    def __init__(self, shards: Sequence[ShardRef], seed: int) -> None:
        self.shards = list(shards)
        self.seed = seed
        self.epoch_size = sum(s.num_sequences for s in self.shards)
        if self.epoch_size == 0:
            raise ValueError("no sequences in the given stores")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            shard_order = rng.permutation(len(self.shards))
            sizes = np.array([self.shards[i].num_sequences for i in shard_order], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            rows = [
                np.random.default_rng([self.seed, epoch, int(i)]).permutation(
                    self.shards[i].num_sequences
                )
                for i in shard_order
            ]
            self._cache = {epoch: (shard_order, starts, rows)}
        return self._cache[epoch]

    def locate(self, position: int) -> tuple[ShardRef, int]:
        """The shard and row of stream position `position` (positions past one epoch wrap into the next)."""
        epoch, offset = divmod(position, self.epoch_size)
        shard_order, starts, rows = self._epoch(epoch)
        j = int(np.searchsorted(starts, offset, side="right")) - 1
        return self.shards[int(shard_order[j])], int(rows[j][offset - starts[j]])


class MicroBatches(Dataset):
    """Map-style dataset: item k is this rank's k-th micro-batch, a `StudentBatch`."""

    def __init__(
        self,
        stores: TrainingStores,
        builder: StudentExampleBuilder,
        *,
        micro_batch_size: int,
        seed: int,
        fields: Sequence[str] = ("token_id", "logp", "boundary_logmass"),
        rank: int = 0,
        world_size: int = 1,
        max_cached_shards: int = 2,
        alignment_caches: Sequence[Any | None] | None = None,
    ) -> None:
        self.store_paths = list(stores.paths)
        self.builder = builder
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.order = SequenceOrder(stores.shards, seed)
        self.max_cached_shards = max_cached_shards
        self.fields = list(fields)
        self._stores: dict[int, TeacherStore] = {}
        self._shards: OrderedDict[tuple[int, int], list] = OrderedDict()
        # per store: an `alm.train.alignments.CachedExamples` (a matching alignment cache) or None (align here)
        self.alignment_caches = list(alignment_caches or [None] * len(self.store_paths))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stores"], state["_shards"] = {}, OrderedDict()  # reopened in each worker
        return state

    def __len__(self) -> int:
        return 2**62

    def positions(self, k: int) -> range:
        """Stream positions of micro-batch `k` on this rank."""
        first = (k * self.world_size + self.rank) * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def sequence(self, position: int):
        """The stored sequence at stream position `position` (reading its whole shard once)."""
        ref, row = self.order.locate(position)
        key = (ref.store_index, ref.shard_index)
        if key not in self._shards:
            store = self._stores.get(ref.store_index)
            if store is None:
                store = self._stores[ref.store_index] = open_store(
                    self.store_paths[ref.store_index]
                )
            self._shards[key] = list(store.read_shard(ref.shard_index, self.fields).sequences())
            while len(self._shards) > self.max_cached_shards:
                self._shards.popitem(last=False)
        self._shards.move_to_end(key)
        return self._shards[key][row]

    def example(self, position: int) -> StudentExample:
        """The student example at stream position `position`: from the store's alignment cache when it has a
        matching one, else built here (tokenize, align, targets)."""
        ref, row = self.order.locate(position)
        seq = self.sequence(position)
        cache = self.alignment_caches[ref.store_index]
        if cache is None:
            return self.builder(seq)
        return cache.example(ref.shard_index, row, seq)

    def __getitem__(self, k: int) -> StudentBatch:
        positions = list(self.positions(k))
        examples: list[StudentExample | None] = [None] * len(positions)
        built: list[
            int
        ] = []  # sequences without an alignment cache: built together (one tokenizer call)
        sequences = []
        for i, position in enumerate(positions):  # in stream order: shards are read once each
            ref, row = self.order.locate(position)
            sequences.append(self.sequence(position))
            cache = self.alignment_caches[ref.store_index]
            if cache is None:
                built.append(i)
            else:
                examples[i] = cache.example(ref.shard_index, row, sequences[i])
        if built:
            batch = self.builder.build_many([sequences[i] for i in built])
            for i, (example, _) in zip(built, batch, strict=True):
                examples[i] = example
        return collate([example for example in examples if example is not None])


def example_builder(
    cfg: TrainRecipe, teacher_vocab: Any, student: StudentTokenizer
) -> StudentExampleBuilder:
    """The recipe's `StudentExampleBuilder` for the student tokenizer `student` (training batches)."""
    return StudentExampleBuilder(
        teacher_vocab=teacher_vocab,
        student_tokenizer=student.tokenizer,
        student_vocab=student.vocab,
        student_family=student.family,
        max_length=cfg.student.max_length,
        boundary_class_ids=cfg.loss.boundary_class_ids(),
        gamma=cfg.loss.gamma,
        debias=cfg.loss.debias,
        with_hidden=cfg.loss.hidden > 0,
        baseline=cfg.loss.baseline(),
    )


def training_fields(cfg: TrainRecipe) -> list[str]:
    """The store fields the recipe's losses read."""
    return (
        ["token_id", "logp", "boundary_logmass"]
        + (["hidden"] if cfg.loss.hidden > 0 else [])
        + (["topk_id", "topk_logp"] if cfg.loss.baseline() is not None else [])
    )


def loss_region_sample_batches(cfg: TrainRecipe) -> int:
    """Micro-batches checked for an empty loss region before training (`step.refuse_empty_loss_region`): the
    first ~64 sequences of each process's stream."""
    return max(1, 64 // cfg.optim.micro_batch_size)


def make_loader(
    dataset: MicroBatches, start: int, stop: int, num_workers: int
) -> Iterator[StudentBatch]:
    """Micro-batches `start, ..., stop - 1` of `dataset`, built in `num_workers` worker processes, in order."""
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=num_workers,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    return iter(loader)
