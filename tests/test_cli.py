"""The `alm` command line: the frozen command/flag set, `--help`, and user errors ending in exit code 2.

Exit-code paths run the installed entry point (`.venv/bin/alm`) in a subprocess, exactly as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALM = Path(sys.executable).parent / "alm"

# The flag set is frozen (STYLE.md §2): changing it is a user-visible change; update this table on purpose.
FROZEN_COMMANDS = {
    "precompute": {
        "recipe": (),
        "--set": (),
        "--shard": (),
        "--overwrite": ("--no-overwrite",),
        "--students": (),
    },
    "train": {
        "recipe": (),
        "--set": (),
        "--dry-run": ("--no-dry-run",),
        "--resume": ("--no-resume",),
        "--overwrite": ("--no-overwrite",),
    },
    "inspect": {"store": (), "--compare": (), "--student": ()},
    "align": {
        "store": (),
        "--student": (),
        "--recipe": (),
        "--max-length": (),
        "--overwrite": ("--no-overwrite",),
    },
    "verify": {"store": (), "--deep": ("--no-deep",)},
    "store finalize": {"store": ()},
    "store push": {"store": (), "url": ()},
    "store pull": {"url": (), "folder": ()},
    "eval": {
        "models": (),
        "--data": (),
        "--teacher-store": (),
        "--json": (),
        "--split": (),
        "--limit": (),
        "--max-bytes": (),
        "--ensemble": ("--no-ensemble",),
        "--combine": (),
        "--device": (),
    },
    "report": {"run_dirs": (), "--out": (), "--title": ()},
}


def _commands(group, ctx, prefix: str = "") -> dict[str, dict[str, tuple[str, ...]]]:
    out = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        full = f"{prefix}{name}"
        if hasattr(cmd, "list_commands"):
            out.update(_commands(cmd, ctx, prefix=f"{full} "))
        else:
            out[full] = {
                (p.opts[0] if p.opts[0].startswith("-") else p.name): tuple(p.secondary_opts)
                for p in cmd.params
            }
    return out


def run_alm(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    return subprocess.run(
        [str(ALM), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def run_alm_in_process(
    args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """`alm.cli.main()` with `sys.argv` set: same code path as the entry point, without a new interpreter."""
    from alm.cli import main

    monkeypatch.setattr(sys, "argv", ["alm", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one `error:` message on stderr that names the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    message = result.stderr[result.stderr.index("error: ") :]
    for needle in needles:
        assert needle in message, (needle, message)


def test_cli_commands_and_options_are_frozen() -> None:
    import click
    import typer.main

    from alm.cli import app

    group = typer.main.get_command(app)
    assert _commands(group, click.Context(group)) == FROZEN_COMMANDS


def test_help_works_for_every_command() -> None:
    from typer.testing import CliRunner

    from alm.cli import app

    runner = CliRunner()
    for command in [[], *[c.split() for c in FROZEN_COMMANDS], ["store"]]:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_installed_entry_point_prints_help() -> None:
    result = run_alm("--help")
    assert result.returncode == 0, result.stderr
    for command in ("precompute", "train", "inspect", "store"):
        assert command in result.stdout


def test_missing_recipe_file_exits_2(tmp_path: Path) -> None:
    assert_user_error(
        run_alm("precompute", str(tmp_path / "nope.yaml")), "nope.yaml", "file not found"
    )


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("teacher: [unclosed\n", ("not valid YAML",)),
        ("- just\n- a list\n", ("mapping",)),
        (
            "teacher: {model: x, flavour: sweet}\ndata: {spec: d.yaml}\noutput: out\nmax_length: -3\n",
            ("teacher.flavour", "unknown key", "max_length"),
        ),
        ("teacher: {model: x}\noutput: out\n", ("data", "Field required")),
    ],
)
def test_malformed_recipe_exits_2_listing_every_problem(
    tmp_path: Path,
    content: str,
    needles: tuple,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, *needles)
    assert not (tmp_path / "out").exists()


def test_bad_shard_exits_2_through_the_entry_point(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: {model: x}\ndata: {spec: d.yaml}\noutput: out\n")
    assert_user_error(run_alm("precompute", str(recipe), "--shard", "3/3"), "--shard", "i/N")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--shard", "x"], ("--shard",)),
        (["--set", "max_length=tiny"], ("max_length",)),
        (["--set", "noequals"], ("key=value",)),
    ],
)
def test_bad_flags_exit_2(
    tmp_path: Path,
    args: list,
    needles: tuple,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("teacher: {model: x}\ndata: {spec: d.yaml}\noutput: out\n")
    assert_user_error(
        run_alm_in_process(["precompute", str(recipe), *args], capsys, monkeypatch), *needles
    )
