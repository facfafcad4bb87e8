"""Fault injection over every file kind of a teacher store written by `alm precompute`: `alm verify`,
`alm train --dry-run` and `alm train` each stop with exit 2 and one message naming the damaged file (issue 9).

The default tier runs every fault through `alm verify` and `alm train --dry-run` (the CLI entry point, in this
process) and one fault per file kind through `alm train`; the `slow` tests run every fault through `alm train` in
this process, and the whole matrix as real `alm` processes. Each prints the fault x command table.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from train_helpers import REPO, train_recipe

SHARD = "shards/shard-00001"
FILE_KINDS = (
    "alm-store.json",
    "alm-store.plan.json",
    "vocab/teacher_vocab.parquet",
    "vocab/tokenizer/tokenizer.json",
    "vocab/tokenizer/tokenizer_config.json",
    f"{SHARD}/shard.json",
    f"{SHARD}/index.arrows.zst",
    f"{SHARD}/arrays/zarr.json",
    f"{SHARD}/arrays/token_id/zarr.json",
    f"{SHARD}/arrays/token_id/c/0",
    f"{SHARD}/arrays/logp/zarr.json",
    f"{SHARD}/arrays/logp/c/0",
    f"{SHARD}/arrays/boundary_logmass/zarr.json",
    f"{SHARD}/arrays/boundary_logmass/c/0/0",
)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FAULTS: dict[str, Callable[[Path], None]] = {
    "flip": _flip,
    "truncate": _truncate,
    "delete": lambda p: shutil.rmtree(p) if p.is_dir() else p.unlink(),
}
ALL_FAULTS = [(rel, fault) for rel in FILE_KINDS for fault in FAULTS] + [(SHARD, "delete")]
# one fault per file kind for `alm train` in the default tier (each run loads a student)
TRAIN_FAULTS = [(rel, list(FAULTS)[i % 3]) for i, rel in enumerate(FILE_KINDS)] + [
    (SHARD, "delete")
]


def _damaged_copy(store: Path, root: Path, rel: str, fault: str, tag: str = "") -> Path:
    copy = root / f"store-{rel.replace('/', '_')}-{fault}{tag}"
    shutil.copytree(store, copy)
    FAULTS[fault](copy / rel)
    return copy


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    from alm.cli import main

    old = sys.argv
    sys.argv = ["alm", *argv]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out + out.err


def _run_process(argv: list[str]) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ALM_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "alm.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _commands(store: Path, root: Path, student_dir: Path, name: str) -> dict[str, list[str]]:
    recipe = train_recipe(
        root / f"{name}.yaml",
        store=store,
        output=root / f"run-{name}",
        student={"model": str(student_dir)},
        optim__steps=3,
    )
    return {
        "alm verify": ["verify", str(store)],
        "alm train --dry-run": ["train", str(recipe), "--dry-run"],
        "alm train": ["train", str(recipe)],
    }


def _matrix(
    stores, student_dir, root: Path, runs: dict[str, list], run, parallel: int = 1
) -> tuple[list[str], list[str]]:
    """Run each command on a damaged copy per fault (`parallel` at a time); return the failures (one per uncaught
    fault) and the fault x command table."""
    jobs = [(command, rel, fault) for command, faults in runs.items() for rel, fault in faults]

    def one(job: tuple[str, str, str]) -> tuple[int, str]:
        command, rel, fault = job
        tag = "-" + command.replace(" ", "_").replace("-", "")
        copy = _damaged_copy(stores["plain"], root, rel, fault, tag)
        name = f"{rel.replace('/', '_')}-{fault}{tag}"
        try:
            return run(_commands(copy, root, student_dir, name)[command])
        finally:
            shutil.rmtree(copy)

    if parallel > 1:
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(one, jobs))
    else:
        results = [one(job) for job in jobs]
    failures, table = [], {}
    for (command, rel, fault), (code, text) in zip(jobs, results, strict=True):
        named = rel in text
        caught = code == 2 and named and "Traceback" not in text
        table[(rel, fault, command)] = "caught" if caught else f"exit {code}"
        if not caught:
            failures.append(
                f"{command} on {fault} {rel}: exit {code}, names file: {named}\n{text[-1500:]}"
            )
    commands = list(runs)
    lines = ["", f"{'fault':58s}" + "".join(f"{c:>22s}" for c in commands)]
    for rel, fault in ALL_FAULTS:
        cells = [table.get((rel, fault, c), "-") for c in commands]
        lines.append(f"{fault + ' ' + rel:58s}" + "".join(f"{c:>22s}" for c in cells))
    for command in commands:
        caught = sum(1 for (_, _, c), v in table.items() if c == command and v == "caught")
        lines.append(f"{command}: {caught}/{len(runs[command])} faults caught")
    return failures, lines


def test_the_intact_store_passes_every_command(stores, student_dir, tmp_path, capsys):
    commands = _commands(stores["plain"], tmp_path, student_dir, "intact")
    for name in ("alm verify", "alm train --dry-run"):
        code, text = _run_in_process(commands[name], capsys)
        assert code == 0, text
    assert "OK" in _run_in_process(commands["alm verify"], capsys)[1]


def test_every_fault_is_caught_by_verify_dry_run_and_train(stores, student_dir, tmp_path, capsys):
    runs = {
        "alm verify": ALL_FAULTS,
        "alm train --dry-run": ALL_FAULTS,
        "alm train": TRAIN_FAULTS,
    }

    def run(argv: list[str]) -> tuple[int, str]:
        return _run_in_process(argv, capsys)

    failures, lines = _matrix(stores, student_dir, tmp_path, runs, run)
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_alm_train_catches_every_fault(stores, student_dir, tmp_path, capsys):
    """The whole matrix through `alm train` (the CLI entry point, in this process)."""

    def run(argv: list[str]) -> tuple[int, str]:
        return _run_in_process(argv, capsys)

    failures, lines = _matrix(stores, student_dir, tmp_path, {"alm train": ALL_FAULTS}, run)
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_fault_is_caught_by_real_alm_processes(stores, student_dir, tmp_path):
    """Every command on every fault as a real `alm` process (two at a time): 129 processes."""
    runs = dict.fromkeys(("alm verify", "alm train --dry-run", "alm train"), ALL_FAULTS)
    failures, lines = _matrix(stores, student_dir, tmp_path, runs, _run_process, parallel=2)
    print("\n".join(lines))
    assert not failures, "\n\n".join(failures)


def test_a_damaged_shard_read_in_a_dataloader_worker_is_one_message(
    stores, student_dir, tmp_path, capsys
):
    rel = f"{SHARD}/arrays/logp/c/0"
    copy = _damaged_copy(stores["plain"], tmp_path, rel, "delete")
    recipe = train_recipe(
        tmp_path / "workers.yaml",
        store=copy,
        output=tmp_path / "run-workers",
        student={"model": str(student_dir)},
        optim__steps=3,
        num_workers=1,
    )
    code, text = _run_in_process(["train", str(recipe)], capsys)
    assert code == 2, text
    error = text[text.index("error: ") :]
    assert error.startswith(
        f"error: teacher store {copy} is damaged: shard 1, file {rel} is missing"
    )
    assert "Traceback" not in error and "DataLoader worker" not in error


def test_verify_deep_rescores_a_sample_within_float16_rounding(stores, capsys):
    from alm.store.reader import open_store
    from alm.verify import deep_rescore

    store = open_store(stores["plain"])
    figures = deep_rescore(store)
    assert figures["num_sequences"] == 8 and figures["num_tokens"] > 0
    # fp32 both times, same CPU kernels; a `compact` store rounds to fewer mantissa bits (docs/store.md): half an
    # ulp at that precision, relative to the largest stored magnitude
    fields = store.manifest.fields
    logp_bits = fields["logp"].get("mantissa_bits")
    max_abs_logp = max(float(np.nanmax(np.abs(seq.logp[1:]), initial=0.0)) for seq in store)
    logp_tolerance = 1e-4 + (max_abs_logp * 2.0 ** -(logp_bits + 1) if logp_bits else 0.0)
    assert figures["max_abs_logp_diff"] <= logp_tolerance
    boundary_bits = fields["boundary_logmass"].get("mantissa_bits") or 10  # stored float16 at most
    assert figures["max_abs_boundary_logmass_diff"] <= 2e-2 * 2.0 ** (10 - boundary_bits)
    code, text = _run_in_process(["verify", str(stores["plain"]), "--deep"], capsys)
    assert code == 0 and "--deep: re-scored 8 sequences" in text, text


_READS: dict[str, Any] = {"root": None, "counts": collections.Counter(), "hooked": False}


def _audit_reads(event: str, args: tuple) -> None:
    root = _READS["root"]
    if root is None or event != "open" or not isinstance(args[0], str):
        return
    mode = args[1] if len(args) > 1 else "r"
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(mode, int) and mode & (os.O_WRONLY | os.O_RDWR)
    )
    if args[0].startswith(root) and not writing and os.path.isfile(args[0]):
        _READS["counts"][os.path.relpath(args[0], root)] += 1


def test_alm_verify_reads_every_store_file_exactly_once(stores, capsys, monkeypatch):
    import pyarrow as pa

    root = str(stores["plain"].resolve())
    listed = {
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if f != "README.md"  # the store card is for people; nothing reads it
    }
    if not _READS[
        "hooked"
    ]:  # audit hooks cannot be removed: one per process, off unless `root` is set
        sys.addaudithook(_audit_reads)
        _READS["hooked"] = True
    memory_map = pa.memory_map

    def counted_memory_map(path, *args, **kwargs):
        if str(path).startswith(root):
            _READS["counts"][os.path.relpath(path, root)] += 1
        return memory_map(path, *args, **kwargs)

    monkeypatch.setattr(pa, "memory_map", counted_memory_map)
    _READS["counts"].clear()
    _READS["root"] = root
    try:
        code, text = _run_in_process(["verify", root], capsys)
    finally:
        _READS["root"] = None
    assert code == 0, text
    assert "re-tokenizes to its stored teacher ids" in text  # the tokenizer files were used, too
    assert dict(_READS["counts"]) == dict.fromkeys(listed, 1)
