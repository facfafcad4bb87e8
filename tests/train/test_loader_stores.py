"""The loader over real stores: several stores, rank sharding, workers, determinism (DESIGN.md stage two)."""

from __future__ import annotations

import dataclasses
import pickle

import torch

from alm.config.train import StoreRef
from alm.store.reader import open_store
from alm.train.batch import StudentBatch, StudentExampleBuilder
from alm.train.loader import MicroBatches, make_loader, open_training_stores
from alm.train.student import load_tokenizer
from alm.vocab import vocab_from_tokenizer


def dataset(stores, student_dir, rank=0, world_size=1, micro_batch_size=3, seed=0) -> MicroBatches:
    tokenizer = load_tokenizer(str(student_dir))
    builder = StudentExampleBuilder(
        teacher_vocab=open_store(str(stores["plain"])).vocab,
        student_tokenizer=tokenizer,
        student_vocab=vocab_from_tokenizer(tokenizer),
        student_family="auto",
        max_length=64,
        boundary_class_ids=[0, 1, 2, 4],
        gamma=0.1,
    )
    refs = [StoreRef(path=str(stores["plain"])), StoreRef(path=str(stores["heldout"]))]
    return MicroBatches(
        open_training_stores(refs),
        builder,
        micro_batch_size=micro_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


def test_two_ranks_split_one_epoch_of_two_stores_exactly(stores, student_dir):
    ranks = [dataset(stores, student_dir, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].order.epoch_size == 8 + 4
    seen = []
    for k in range(2):  # 2 micro-batches x 2 ranks x 3 sequences = 12 = one epoch
        for ds in ranks:
            for position in ds.positions(k):
                ref, row = ds.order.locate(position)
                seen.append((ref.store_index, ref.shard_index, row))
    assert len(seen) == len(set(seen)) == 12
    assert {s for s, _, _ in seen} == {0, 1}


def test_batches_are_a_pure_function_of_the_index_with_or_without_workers(stores, student_dir):
    ds = dataset(stores, student_dir)
    copy = pickle.loads(pickle.dumps(ds))
    assert_same_batch(ds[5], copy[5])
    in_process = list(make_loader(ds, 2, 6, num_workers=0))
    with_workers = list(make_loader(ds, 2, 6, num_workers=2))
    assert len(in_process) == len(with_workers) == 4
    for a, b in zip(in_process, with_workers, strict=True):
        assert_same_batch(a, b)


def assert_same_batch(a: StudentBatch, b: StudentBatch) -> None:
    def tensors(batch: StudentBatch) -> dict[str, torch.Tensor]:
        out = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        targets = out.pop("targets")
        out.update(
            {f"targets.{f.name}": getattr(targets, f.name) for f in dataclasses.fields(targets)}
        )
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}

    tensors_a, tensors_b = tensors(a), tensors(b)
    assert tensors_a.keys() == tensors_b.keys() and "targets.group_mask" in tensors_a
    for key, value in tensors_a.items():
        assert torch.equal(value, tensors_b[key]), key
