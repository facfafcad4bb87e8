"""`bench/gpu_perf.py` (the GPU check of issue 11 target 4) runs its whole CPU-side logic in `--tiny` mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_perf_tiny_mode_runs_every_figure_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_perf.py"), "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    ).stdout
    for figure in (
        "precompute (HF backend):",
        "precompute / peak bf16 FLOP rate: n/a",
        "precompute / bare forward on the same packed rows:",
        "ALM step:",
        "ALM step / SFT step:",
    ):
        assert figure in out, out
    assert "pack=True" in out
