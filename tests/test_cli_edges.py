"""Small CLI and config edges (issue 10 item 9): `--set` into a data-spec file, messages for a missing recipe or
teacher folder, cross-field errors without a recipe dump, stable document ids (`id_field`), `data.limit` reading
every source, `threads`. Exit-code paths run `python -m alm.cli` in real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def alm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ALM_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "alm.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def text_of(document) -> bytes:
    return b"".join(segment.text for segment in document.segments)


def spec_file(tmp_path: Path, sources: list[dict], **extra) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "edges", "sources": sources, **extra}))
    return path


def precompute_recipe(tmp_path: Path, spec: Path, teacher: str, **extra) -> Path:
    path = tmp_path / "precompute.yaml"
    recipe = {
        "teacher": {"model": teacher, "backend": "hf", "device": "cpu", "dtype": "float32"},
        "data": {"spec": str(spec), "split": "all"},
        "output": str(tmp_path / "store"),
        "max_length": 32,
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_set_reaches_into_a_data_spec_file_with_list_indices(tmp_path):
    from alm.config.precompute import load_precompute_recipe
    from alm.precompute import load_documents

    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "from the first file"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "from the second file"}])
    spec = spec_file(tmp_path, [{"type": "jsonl", "path": str(first)}])
    recipe_path = precompute_recipe(tmp_path, spec, "/no/such/teacher")
    recipe = load_precompute_recipe(recipe_path, [f"data.spec.sources.0.path={second}"])
    assert recipe.data.spec == str(spec)  # still the file, not a mapping
    selected = load_documents(recipe, recipe_path)
    texts = [text_of(d) for docs in selected.shards.values() for d in docs]
    assert texts == [b"from the second file"]
    # through the CLI: the overridden path is the one refused
    result = alm("precompute", str(recipe_path), "--set", "data.spec.sources.0.path=/no/such.jsonl")
    assert result.returncode == 2 and "/no/such.jsonl" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_local_teacher_folder_gets_our_message_not_the_hubs(tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", [{"text": "some text"}])
    recipe = precompute_recipe(
        tmp_path, spec_file(tmp_path, [{"type": "jsonl", "path": str(data)}]), "/no/such/teacher"
    )
    result = alm("precompute", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "'/no/such/teacher': no such folder" in result.stderr
    assert "Repo id" not in result.stderr and "Traceback" not in result.stderr


def test_missing_train_recipe_suggests_a_train_recipe(tmp_path):
    result = alm("train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "stages/demo_train.yaml" in result.stderr and "precompute" not in result.stderr


def test_cross_field_error_is_one_line_without_the_recipe_dump(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stores": ["s"],
                "student": {"model": "m"},
                "optim": {"steps": 2, "warmup_steps": 5},
                "output_dir": str(tmp_path / "out"),
                "checkpoint_every": 10,  # larger than optim.steps: the final checkpoint only, not an error
            }
        )
    )
    result = alm("train", str(recipe), "--dry-run")
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 1 and "warmup_steps (5) exceeds optim.steps (2)" in problems[0]
    assert "'stores'" not in result.stderr and "checkpoint_every" not in result.stderr


def test_id_field_keeps_the_heldout_split_when_lines_are_reordered(tmp_path):
    from alm.data.specs import iter_documents, load_data_spec

    records = [{"id": f"doc-{i}", "text": f"document number {i}"} for i in range(200)]

    def heldout_texts(lines: list[dict], id_field: str | None) -> set[bytes]:
        data = write_jsonl(tmp_path / "data.jsonl", lines)
        source = {"type": "jsonl", "path": str(data)}
        if id_field:
            source["id_field"] = id_field
        spec = load_data_spec(spec_file(tmp_path, [source], heldout_fraction=0.2))
        return {text_of(d) for d in iter_documents(spec, split="heldout")}

    shuffled = records[::-1]
    with_ids = heldout_texts(records, "id")
    assert with_ids and with_ids == heldout_texts(shuffled, "id")
    assert heldout_texts(records, None) != heldout_texts(shuffled, None)  # file:line ids move


def test_data_limit_reads_every_source(tmp_path):
    from alm.config.precompute import load_precompute_recipe
    from alm.precompute import load_documents

    first = write_jsonl(tmp_path / "a.jsonl", [{"text": f"first {i}"} for i in range(10)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": f"second {i}"} for i in range(10)])
    spec = spec_file(
        tmp_path, [{"type": "jsonl", "path": str(first)}, {"type": "jsonl", "path": str(second)}]
    )
    recipe_path = precompute_recipe(tmp_path, spec, "/no/such/teacher", threads=1)
    recipe = load_precompute_recipe(recipe_path, ["data.limit=4"])
    assert recipe.threads == 1
    selected = load_documents(recipe, recipe_path)
    texts = [text_of(d) for docs in selected.shards.values() for d in docs]
    assert texts == [b"first 0", b"second 0", b"first 1", b"second 1"]
