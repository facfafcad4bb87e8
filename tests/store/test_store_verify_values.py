"""`alm verify`'s value invariants, each broken once on purpose: the report names the shard, sequence and field."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from alm.store.reader import ShardData
from alm.store.verify import value_problems


def _shard(**changes) -> ShardData:
    # two sequences of 3 and 2 tokens
    arrays = {
        "token_id": np.array([1, 2, 3, 4, 5], np.int32),
        "logp": np.array([np.nan, -1.0, -2.0, np.nan, -0.5], np.float32),
        "boundary_logmass": np.log(np.full((5, 5), 0.1)).astype(np.float16),
    }
    for name, (position, value) in changes.items():
        arrays[name] = arrays[name].copy()
        arrays[name][position] = value
    index = pa.table(
        {
            "seq_id": [10, 11],
            "token_start": [0, 3],
            "token_end": [3, 5],
        }
    )
    return ShardData(shard_index=0, index=index, arrays=arrays)


def test_a_sound_shard_has_no_problems():
    assert value_problems(_shard(), vocab_size=8, where="shards/shard-00000") == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"logp": (3, -1.0)},
            "seq_id=11 (row 1), field logp, token 0: the first token's logp must be NaN",
        ),
        (
            {"logp": (4, 0.5)},
            "seq_id=11 (row 1), field logp, token 1: logp must be finite and <= 0",
        ),
        ({"logp": (1, np.nan)}, "seq_id=10 (row 0), field logp, token 1: logp must be finite"),
        ({"logp": (2, -np.inf)}, "seq_id=10 (row 0), field logp, token 2: logp must be finite"),
        (
            {"token_id": (4, 8)},
            "seq_id=11 (row 1), field token_id, token 1: id outside the vocabulary",
        ),
        ({"token_id": (0, -1)}, "seq_id=10 (row 0), field token_id, token 0: id outside"),
        (
            {"boundary_logmass": (2, np.log(0.5))},
            "seq_id=10 (row 0), field boundary_logmass, token 2: the",
        ),
        (
            {"boundary_logmass": (1, np.nan)},
            "seq_id=10 (row 0), field boundary_logmass, token 1: NaN",
        ),
    ],
)
def test_each_broken_invariant_names_the_shard_sequence_and_field(change, expected):
    problems = value_problems(_shard(**change), vocab_size=8, where="shards/shard-00000")
    assert problems and problems[0].startswith(f"shards/shard-00000: sequence {expected}"), problems
