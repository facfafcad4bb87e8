"""`alm.train.log`: metrics records, their truncation on resume, and the metrics plot."""

from __future__ import annotations

import json

import pytest

from alm.train.log import PLOT_FILE, plot_metrics, read_metrics, truncate_metrics


def write_records(folder, records):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_truncate_keeps_records_up_to_the_checkpoint_step(tmp_path):
    write_records(tmp_path, [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    truncate_metrics(tmp_path, last_step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_plot_draws_losses_and_bits_per_byte_into_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": 0, "eval/student_bpb": 9.0, "eval/teacher_bpb": 1.5}]
    records += [{"step": s, "loss": 1.0 / s, "alm": 0.5 / s, "sft": 2.0 / s} for s in range(1, 9)]
    records += [{"step": 8, "eval/student_bpb": 4.0, "eval/teacher_bpb": 1.5}]
    write_records(tmp_path, records)
    path = plot_metrics(tmp_path)
    assert path == tmp_path / PLOT_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_an_empty_run_is_skipped(tmp_path):
    assert plot_metrics(tmp_path) is None
