"""`alm report`: the Markdown table's figures, the PNG, shared axes for several runs, no matplotlib, bad folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_cli import assert_user_error, run_alm_in_process

from alm.report import REPORT_MD, REPORT_PNG, gap_closed, load_runs, markdown_table, write_report
from alm.train.log import RunLog


def make_run(
    folder: Path, losses: list[float], bpb: list[float], teacher: float, every: int = 2
) -> Path:
    """A run folder written by the training loop's own logger."""
    log = RunLog(folder, total_steps=len(losses), start_step=0, enabled=True)
    log.write(
        0,
        {"eval/student_bpb": bpb[0], "eval/teacher_bpb": teacher, "eval/chunk_abs_logp_diff": 2.0},
    )
    for step, loss in enumerate(losses, start=1):
        log.write(
            step, {"loss": loss, "alm": loss / 2, "sft": loss * 2, "lr": 1e-3, "grad_norm": 0.5}
        )
        if step % every == 0:
            log.write(
                step,
                {
                    "eval/student_bpb": bpb[step // every],
                    "eval/teacher_bpb": teacher,
                    "eval/chunk_abs_logp_diff": 2.0 / step,
                },
            )
    log.close()
    return folder


def test_table_has_first_last_and_the_gap_closed(tmp_path: Path) -> None:
    a = make_run(tmp_path / "sft", [3.0, 2.5, 2.0, 1.8], [4.0, 3.0, 2.5], teacher=1.5)
    b = make_run(tmp_path / "alm", [1.0, 0.9, 0.8, 0.7], [4.0, 3.5, 3.0], teacher=1.5)
    table = markdown_table(load_runs([a, b]))
    lines = table.splitlines()
    assert lines[0].startswith("| run | steps | final loss | student_bpb first | student_bpb last")
    sft = lines[2].split(" | ")
    assert sft[0] == "| sft" and sft[1] == "4" and sft[2] == "1.8000"
    assert "4.0000" in sft and "2.5000" in sft and "1.5000" in sft
    assert sft[-1].strip(" |") == f"{(4.0 - 2.5) / (4.0 - 1.5):.1%}"  # 60.0%
    assert lines[3].split(" | ")[-1].strip(" |") == "40.0%"
    assert gap_closed(4.0, 4.0, 1.5) == 0.0 and gap_closed(1.0, 0.5, 1.5) is None


def test_report_writes_a_png_with_every_run_on_shared_axes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = [
        make_run(tmp_path / name, [3.0 - k, 2.0, 1.0, 0.5], [4.0, 3.0 - k / 2, 2.0], teacher=1.5)
        for k, name in enumerate(["sft", "alm", "alm+sft"])
    ]
    summary = write_report(runs, tmp_path / "out", title="three methods")
    png = tmp_path / "out" / REPORT_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert (tmp_path / "out" / REPORT_MD).read_text().startswith("# three methods")
    assert str(png) in summary


def test_without_matplotlib_the_table_is_written_and_the_message_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    run = make_run(tmp_path / "run", [1.0, 0.5], [3.0, 2.0], teacher=1.0)
    summary = write_report([run], tmp_path / "out")
    assert "matplotlib is not installed" in summary and "alm[demo]" in summary
    assert (tmp_path / "out" / REPORT_MD).is_file() and not (tmp_path / "out" / REPORT_PNG).exists()


def test_runs_with_the_same_folder_name_get_distinct_labels(tmp_path: Path) -> None:
    a = make_run(tmp_path / "x" / "student", [1.0, 0.5], [3.0, 2.0], teacher=1.0)
    b = make_run(tmp_path / "y" / "student", [1.0, 0.5], [3.0, 2.0], teacher=1.0)
    assert [r.name for r in load_runs([a, b])] == ["x/student", "y/student"]


def test_report_cli_and_a_folder_that_is_not_a_run(tmp_path: Path, capsys, monkeypatch) -> None:
    run = make_run(tmp_path / "run", [1.0, 0.5], [3.0, 2.0], teacher=1.0)
    ok = run_alm_in_process(["report", str(run), "--out", str(tmp_path / "o")], capsys, monkeypatch)
    assert ok.returncode == 0, ok.stderr
    assert "| run |" in ok.stdout
    bad = run_alm_in_process(["report", str(tmp_path)], capsys, monkeypatch)
    assert_user_error(bad, "metrics.jsonl", str(tmp_path))
