"""`alm report RUN_DIR...`: runs side by side, as PNG plots on shared axes and a Markdown table (docs/evaluation.md).

    alm report runs/demo/student_bytes
    alm report runs/sft runs/alm runs/alm_sft --out runs/report --title "byte student"

Reads each run's `metrics.jsonl` (`alm.train.log`): training records (`loss` and the per-loss values `alm`,
`sft`, `hidden`, plus `grad_norm`) and held-out evaluations (`eval/*`). Writes into `--out`:

- `report.png`: one panel per quantity against the optimizer step, one colour per run on every panel; the
  held-out bits-per-byte panel draws the teacher's figure as a dashed line;
- `report.md`: a table with, per run, its steps, final training loss, and for each held-out metric the first and
  last value; with a teacher bits per byte, the fraction of the initial gap to the teacher that the run closed,
  (first − last) / (first − teacher).

Plots need matplotlib (`pip install 'alm[demo]'`); without it the table is still written and the message says so.
Imports `alm.train.log` and `alm.errors` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alm.errors import DataError
from alm.train.log import METRICS_FILE, read_metrics

REPORT_PNG = "report.png"
REPORT_MD = "report.md"
TRAIN_KEYS = ("loss", "alm", "sft", "hidden", "grad_norm")
STUDENT_BPB = "eval/student_bpb"
TEACHER_BPB = "eval/teacher_bpb"
_EVAL_SKIP = {TEACHER_BPB, "eval/num_sequences"}


@dataclass(frozen=True)
class RunMetrics:
    """One run's records split into training and held-out series."""

    name: str
    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        records = self.evals if key.startswith("eval/") else self.train
        points = [(r["step"], _number(r.get(key))) for r in records]
        points = [(s, v) for s, v in points if v is not None]
        return [s for s, _ in points], [v for _, v in points]

    @property
    def teacher_bpb(self) -> float | None:
        values = [_number(r.get(TEACHER_BPB)) for r in self.evals]
        values = [v for v in values if v is not None]
        return values[-1] if values else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _names(paths: Sequence[Path]) -> list[str]:
    """Each run's folder name, or more of its path where names repeat."""
    for depth in range(1, 6):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(
    run_dirs: Sequence[str | Path], names: Sequence[str] | None = None
) -> list[RunMetrics]:
    """Read the runs' `metrics.jsonl`.

    Raises:
        DataError: a folder has no metrics (not a run folder, or a run that logged nothing).
    """
    paths = [Path(d) for d in run_dirs]
    missing = [str(p) for p in paths if not (p / METRICS_FILE).is_file()]
    if missing:
        raise DataError(
            f"no {METRICS_FILE} in {', '.join(missing)}: give the output_dir of `alm train` runs"
        )
    labels = list(names) if names else _names(paths)
    runs = []
    for path, name in zip(paths, labels, strict=True):
        records = read_metrics(path)
        runs.append(
            RunMetrics(
                name=name,
                path=path,
                train=[r for r in records if any(k in r for k in TRAIN_KEYS)],
                evals=[r for r in records if any(k.startswith("eval/") for k in r)],
            )
        )
    return runs


def _keys(runs: Sequence[RunMetrics]) -> tuple[list[str], list[str]]:
    train = [k for k in TRAIN_KEYS if any(run.series(k)[0] for run in runs)]
    evals = sorted(
        {k for run in runs for r in run.evals for k in r if k.startswith("eval/")} - _EVAL_SKIP,
        key=lambda k: (k != STUDENT_BPB, k),
    )
    return train, [k for k in evals if any(run.series(k)[0] for run in runs)]


def gap_closed(first: float, last: float, teacher: float) -> float | None:
    """Fraction of the initial gap to the teacher closed: (first − last) / (first − teacher)."""
    gap = first - teacher
    return (first - last) / gap if gap > 0 else None


def markdown_table(runs: Sequence[RunMetrics], title: str | None = None) -> str:
    """The runs' summary as Markdown (see the module docstring)."""
    _, eval_keys = _keys(runs)
    header = ["run", "steps", "final loss"]
    for key in eval_keys:
        short = key.removeprefix("eval/")
        header += [f"{short} first", f"{short} last"]
    has_teacher = any(run.teacher_bpb is not None for run in runs)
    if has_teacher:
        header += ["teacher bpb", "gap closed"]
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        steps, losses = run.series("loss")
        row = [run.name, str(max(steps, default=0)), f"{losses[-1]:.4f}" if losses else "–"]
        for key in eval_keys:
            _, values = run.series(key)
            row += [f"{values[0]:.4f}", f"{values[-1]:.4f}"] if values else ["–", "–"]
        if has_teacher:
            _, bpb = run.series(STUDENT_BPB)
            teacher = run.teacher_bpb
            closed = gap_closed(bpb[0], bpb[-1], teacher) if bpb and teacher is not None else None
            row += [
                f"{teacher:.4f}" if teacher is not None else "–",
                f"{closed:.1%}" if closed is not None else "–",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: Sequence[RunMetrics], path: Path, title: str | None = None) -> Path | None:
    """Draw every quantity against the step, one colour per run; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train_keys, eval_keys = _keys(runs)
    keys = [*train_keys, *eval_keys]
    if not keys:
        return None
    columns = min(3, len(keys))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 3.6 * rows), layout="constrained", squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys, strict=False):
        for k, run in enumerate(runs):
            steps, values = run.series(key)
            if steps:
                # held-out points always marked; training series too when short (one point draws no line)
                marker = "o" if key.startswith("eval/") or len(steps) <= 20 else None
                ax.plot(
                    steps,
                    values,
                    marker=marker,
                    markersize=3,
                    label=run.name,
                    color=colours[k % len(colours)],
                )
        if key == STUDENT_BPB:
            teachers = {run.teacher_bpb for run in runs if run.teacher_bpb is not None}
            for teacher in sorted(teachers):
                ax.axhline(
                    teacher,
                    color="gray",
                    linestyle="--",
                    linewidth=1,
                    label=f"teacher {teacher:.3f}",
                )
        if key == "grad_norm" or (key in ("loss", "alm", "sft") and _spans_decades(runs, key)):
            ax.set_yscale("log")
        ax.set(
            xlabel="optimizer step",
            title=key.removeprefix("eval/") + (" (held-out)" if key.startswith("eval/") else ""),
        )
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_axis_off()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _spans_decades(runs: Sequence[RunMetrics], key: str) -> bool:
    values = [v for run in runs for v in run.series(key)[1] if v > 0]
    return bool(values) and max(values) / min(values) > 30


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """Write `report.md` (always) and `report.png` (with matplotlib) for the runs; return a summary to print.

    Raises:
        DataError: a folder is not a run folder.
    """
    runs = load_runs(run_dirs, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs, title)
    (out / REPORT_MD).write_text(table, encoding="utf-8")
    png = plot_runs(runs, out / REPORT_PNG, title)
    lines = [table, f"table: {out / REPORT_MD}"]
    if png is None:
        lines.append(
            "plots: not drawn, matplotlib is not installed (pip install 'alm[demo]' or pip install matplotlib)"
        )
    else:
        lines.append(f"plots: {png}")
    return "\n".join(lines)
