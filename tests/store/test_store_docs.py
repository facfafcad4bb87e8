"""The reading example in docs/store.md runs with plain zarr + pyarrow (no alm import) and reads the right data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_plan, random_store

DOC = Path(__file__).resolve().parents[2] / "docs" / "store.md"


def docs_snippet() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- snippet: read-store.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/store.md lost its read-store snippet"
    return match.group(1)


@pytest.mark.parametrize("compression", ["small", "fast", "none"])
def test_docs_snippet_reads_a_store_without_alm(tmp_path, compression):
    plan = make_plan(num_shards=2, compression=compression)
    shards = random_store(tmp_path / "store", plan, num_per_shard=3)
    code = docs_snippet().replace('STORE = "path/to/store"', f"STORE = {str(tmp_path / 'store')!r}")
    code += "\nimport sys\nassert not any(m == 'alm' or m.startswith('alm.') for m in sys.modules), 'imported alm'\n"
    # -I: isolated mode, so neither the checkout nor the tests folder is on sys.path
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    lines = out.stdout.strip().splitlines()
    expected = []
    for seq in (s for shard in shards for s in shard):
        prob = np.exp(seq["boundary_logmass"].astype(np.float32)).sum(axis=1)
        expected.append(
            (
                seq["seq_id"],
                len(seq["text"]),
                len(seq["token_id"]),
                float(np.nansum(seq["logp"])),
                int((prob > 0.1).sum()),
            )
        )
    assert len(lines) == len(expected)
    for line, (seq_id, num_bytes, num_tokens, logp_sum, num_above) in zip(lines, expected):
        got = line.split()
        assert [int(got[0]), int(got[1]), int(got[2]), int(got[4])] == [
            seq_id,
            num_bytes,
            num_tokens,
            num_above,
        ]
        assert float(got[3]) == np.float32(logp_sum) or abs(float(got[3]) - logp_sum) < 1e-4
