"""Watching a run: a tqdm progress bar, metrics as JSONL (and TensorBoard when installed), a readable log.

`RunLog` is used on the main process only. Files it writes in the run folder:

- `metrics.jsonl`: one JSON object per logged step (`step`, `loss`, per-loss values, `lr`, `grad_norm`,
  `tokens_per_s`, ...) and per evaluation (`eval/*`);
- `train.log`: the readable log (the `alm` loggers, INFO and above);
- `tensorboard/`: the same scalars, with `report_to: [tensorboard]`;
- `wandb/`: the Weights & Biases run files, with `report_to: [wandb]` (`WANDB_MODE=offline` keeps them local);
- `metrics.png`: losses and held-out bits per byte, drawn at the end when `matplotlib` is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


class RunLog:
    """Progress bar, JSONL metrics, the trackers' scalars (`report_to`) and the run's log file."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        report_to: Sequence[str] = (),
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self._metrics = None
        self._tb = None
        self._wandb = None
        self._handler: logging.Handler | None = None
        self._last_time = time.perf_counter()
        self._tokens = 0
        # log lines go through tqdm.write, so they never glue onto the bar (as in `alm precompute`)
        self._redirect = logging_redirect_tqdm() if enabled else None
        if self._redirect is not None:
            self._redirect.__enter__()
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (output_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._handler = logging.FileHandler(output_dir / LOG_FILE, encoding="utf-8")
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger("alm").addHandler(self._handler)
        # the recipe checked that each tracker's package is installed (`TrainRecipe.report_to`)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / TENSORBOARD_DIR))
        if "wandb" in report_to:
            self._wandb = _start_wandb(output_dir, run_config or {})

    def count_tokens(self, num_tokens: int) -> None:
        """Add student tokens processed since the last logged step (for tokens/s)."""
        self._tokens += num_tokens

    def step(self, step: int, metrics: dict[str, float], write: bool) -> None:
        """Advance the bar to `step` and, when `write`, append `metrics` (plus tokens/s) to the files."""
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        metrics = {**metrics, "tokens_per_s": self._tokens / elapsed}
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{metrics.get('loss', math.nan):.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
        )
        if write:
            self.write(step, metrics)
        self._last_time, self._tokens = now, 0

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSONL record (and TensorBoard scalars)."""
        if not self.enabled or self._metrics is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def evaluation(self, step: int, figures: dict[str, float] | None) -> None:
        """Record held-out figures of `step` (nothing when the run has no evaluation)."""
        if figures is None or not self.enabled:
            return
        # the evaluation's time is not the steps': leave it out of the bar's ETA and the next step's tokens/s
        self.bar.unpause()
        self._last_time = time.perf_counter()
        self.write(step, figures)
        logger.info(
            "eval at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in figures.items())
        )

    def close(self) -> None:
        """Close the bar and the files."""
        self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._handler is not None:
            logging.getLogger("alm").removeHandler(self._handler)
            self._handler.close()


TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
_WANDB_ID_FILE = "alm-run-id"


def _start_wandb(output_dir: Path, run_config: dict[str, Any]) -> Any:
    """A Weights & Biases run in `OUTPUT/wandb/`; a resumed run continues the same W&B run (its id is kept in
    `OUTPUT/wandb/alm-run-id`). Project and mode come from `WANDB_PROJECT` (default `alm`) and `WANDB_MODE`."""
    import wandb  # pyright: ignore[reportMissingImports]  (the optional `wandb` extra)

    folder = output_dir / WANDB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / _WANDB_ID_FILE
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(8) + "\n", encoding="utf-8")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "alm"),
        name=output_dir.resolve().name,
        id=id_file.read_text(encoding="utf-8").strip(),
        resume="allow",
        dir=str(output_dir),
        config=run_config,
        settings=wandb.Settings(console="off"),
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's `metrics.jsonl` (empty if none)."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def truncate_metrics(output_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by an interrupted run past its last checkpoint) and the evaluation
    of `last_step` (the resumed run evaluates that step again, so it is recorded exactly once) before resuming."""
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and _kept(json.loads(line), last_step)
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _kept(record: dict[str, Any], last_step: int) -> bool:
    step = record.get("step", 0)
    is_eval = any(key.startswith("eval/") for key in record)
    return step < last_step or (step == last_step and not is_eval)


PLOT_FILE = "metrics.png"


def plot_metrics(output_dir: Path) -> Path | None:
    """Draw `metrics.png` from a run's `metrics.jsonl`: the training losses per step and, when the run was
    evaluated, the held-out bits per byte of the student against the teacher's.

    Returns:
        the image's path, or None when matplotlib is not installed or there is nothing to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(output_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/student_bpb" in r]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    steps = [r["step"] for r in train]
    for key in ("loss", "alm", "sft", "hidden"):
        values = [r.get(key) for r in train]
        if any(isinstance(v, (int, float)) for v in values):
            ax_loss.plot(steps, values, marker=".", label=key)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax_loss.legend()
    if evals:
        eval_steps = [r["step"] for r in evals]
        ax_bpb.plot(eval_steps, [r["eval/student_bpb"] for r in evals], marker="o", label="student")
        ax_bpb.axhline(evals[-1]["eval/teacher_bpb"], color="gray", linestyle="--", label="teacher")
        ax_bpb.set(xlabel="optimizer step", ylabel="bits per byte", title="held-out bits per byte")
        ax_bpb.legend()
    else:
        ax_bpb.set_axis_off()
    path = output_dir / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
