"""Seconds per training step of each reproduction student at each torch thread count (run it alone).

    .venv/bin/python scripts/repro_step_time.py --root runs/repro --students bytes,bpe --threads 1,2

Needs the study's stores and BPE tokenizer under ROOT (scripts/reproduce.py makes them). Starts `alm train` with the
student's recipe (evaluation off), times the arrival of each step's line in metrics.jsonl, stops the run after
`--steps` steps, and prints the median seconds per step (the first step, which includes warm-up, is left out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds_per_step(root: Path, student: str, threads: int, steps: int) -> list[float]:
    out = Path(tempfile.mkdtemp(prefix=f"alm-step-time-{student}-{threads}-"))
    shutil.rmtree(out)
    sets = [
        f"stores.0.path={root / 'teacher_store'}",
        f"eval.store={root / 'teacher_store_heldout'}",
        f"optim.steps={steps + 10}",
        "eval.every=0",
        f"output_dir={out}",
    ]
    if student == "bpe":
        sets.append(f"student.transfer.tokenizer={root / 'bpe_tokenizer'}")
    args = [
        str(REPO / ".venv" / "bin" / "alm"),
        "train",
        str(REPO / f"stages/repro_train_{student}.yaml"),
    ]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    arrivals: list[float] = []
    metrics = out / "metrics.jsonl"
    try:
        while len(arrivals) < steps + 1 and proc.poll() is None:
            if metrics.is_file():
                lines = [line for line in metrics.read_text().splitlines() if '"loss"' in line]
                arrivals += [time.perf_counter()] * (len(lines) - len(arrivals))
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    return [b - a for a, b in itertools.pairwise(arrivals)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=str(REPO / "runs" / "repro"))
    parser.add_argument("--students", default="bytes,bpe")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="Write the timings here.")
    args = parser.parse_args()
    results = {}
    for student in args.students.split(","):
        for threads in [int(t) for t in args.threads.split(",")]:
            per_step = seconds_per_step(Path(args.root).resolve(), student, threads, args.steps)
            median = sorted(per_step)[len(per_step) // 2] if per_step else float("nan")
            results[f"{student}/threads={threads}"] = {"median_s": median, "steps_s": per_step}
            print(
                f"{student:6s} threads={threads}: median {median:.2f} s/step  {[round(p, 2) for p in per_step]}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
