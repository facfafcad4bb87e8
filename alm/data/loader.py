"""The training data loader: teacher-store sequences -> student micro-batches, deterministic and resumable.

Owns the sequence order, sharding across ranks, worker processes and the data position (DESIGN.md stage two):

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
  `batch_size=None`: workers build the student tensors (tokenize, align, ALM targets) in parallel and the
  DataLoader returns them in index order.

Imports `alm.store` (reader) and `alm.data.student`; never `torch.distributed` (ranks come in as integers).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from alm.data.student import StudentExampleBuilder, collate_examples
from alm.store.reader import TeacherStore, open_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard of one store, with its number of sequences."""

    store_index: int
    shard_index: int
    num_sequences: int


def list_shards(store_paths: Sequence[str]) -> list[ShardRef]:
    """Every shard of every store, in store order then shard order."""
    refs = []
    for s, path in enumerate(store_paths):
        store = open_store(path)
        for shard in store.manifest["shards"]:
            if int(shard["num_sequences"]) > 0:
                refs.append(ShardRef(s, int(shard["index"]), int(shard["num_sequences"])))
    return refs


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
    """Map-style dataset: item k is this rank's k-th micro-batch, collated and padded."""

    def __init__(
        self,
        store_paths: Sequence[str],
        builder: StudentExampleBuilder,
        *,
        micro_batch_size: int,
        seed: int,
        fields: Sequence[str] = ("token_id", "logp", "boundary_logmass"),
        rank: int = 0,
        world_size: int = 1,
        max_cached_shards: int = 2,
    ) -> None:
        self.store_paths = list(store_paths)
        self.builder = builder
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.order = SequenceOrder(list_shards(self.store_paths), seed)
        self.max_cached_shards = max_cached_shards
        self.fields = list(fields)
        self._stores: dict[int, TeacherStore] = {}
        self._shards: OrderedDict[tuple[int, int], list] = OrderedDict()

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

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        examples = [self.builder(self.sequence(p)) for p in self.positions(k)]
        return collate_examples(examples)


def make_loader(
    dataset: MicroBatches, start: int, stop: int, num_workers: int
) -> Iterator[dict[str, torch.Tensor]]:
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
