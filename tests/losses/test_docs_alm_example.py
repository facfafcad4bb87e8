"""The runnable example in docs/alm.md runs and prints the chunk ranges it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "alm.md"


def test_docs_alm_example_runs_and_prints_the_documented_chunks():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(blocks[0], str(DOC), "exec"), {})
    lines = output.getvalue().splitlines()
    assert lines[0] == "[1 2 3 4] [2 3 4 5]"
    assert lines[1] == "[ 1  4  8 12] [ 4  8 12 13]"
    assert int(lines[2].split()[0]) > 0
