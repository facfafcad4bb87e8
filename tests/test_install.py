"""The plain `pip install .` path (issue 10 item 10): the wheel built from this checkout, installed into a fresh
virtual environment, holds every module of the package and runs the `alm` command.

Offline by construction: the wheel is built from a copy of the package's files (no stale `build/` of the checkout
can leak into it) without build isolation (setuptools from the test environment) and installed with `--no-deps --no-index`; the fresh environment sees the test environment's third-party packages
(torch, transformers, ...) through a `.pth` line, as `--system-site-packages` would, but not its editable install
of this checkout, so what runs is the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # a copy of what the build reads, so setuptools' build/ and *.egg-info land there, never in the checkout
    checkout = tmp_path / "src"
    shutil.copytree(REPO / "alm", checkout / "alm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, checkout / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(checkout),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("alm-*.whl")
    # every module of the source tree is in the wheel
    source = {str(p.relative_to(REPO)) for p in (REPO / "alm").rglob("*.py")}
    with zipfile.ZipFile(wheel) as archive:
        packed = {n for n in archive.namelist() if n.endswith(".py")}
        entry_points = archive.read(
            next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        )
    assert source == packed, sorted(source ^ packed)
    assert b"alm = alm.cli:main" in entry_points

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, env=env)
    python = fresh / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # the test environment's packages, without processing its .pth files (its editable `alm`)
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        env=env,
    )
    imported = subprocess.run(
        [
            str(python),
            "-c",
            "import alm, alm.cli, alm.train.loop, alm.precompute, alm.eval.run; print(alm.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert Path(imported.stdout.strip()).is_relative_to(fresh_site), imported.stdout
    help_text = subprocess.run(
        [str(fresh / "bin" / "alm"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    ).stdout
    assert "precompute" in help_text and "train" in help_text
    # a user error through the installed command: one message, exit code 2
    missing = subprocess.run(
        [str(fresh / "bin" / "alm"), "train", str(tmp_path / "no-such-recipe.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "no-such-recipe.yaml" in missing.stderr
