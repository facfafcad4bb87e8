"""`alm eval` through the command line: the table, the JSON (equal to the library's figures), user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import bpe_tokenizer, byte_tokenizer, corpus_texts, tiny_llama
from test_cli import assert_user_error, run_alm_in_process

from alm.eval import load_eval_texts, score_texts
from alm.eval.models import load_hf_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("eval_models")
    out = []
    for name, tokenizer, seed in (
        ("bpe", bpe_tokenizer(512), 1),
        ("bpe2", bpe_tokenizer(512), 2),
        ("bytes", byte_tokenizer(), 3),
    ):
        tiny_llama(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out.append(root / name)
    return out


def test_eval_prints_a_table_and_writes_the_library_figures_as_json(
    model_dirs, tmp_path: Path, capsys, monkeypatch
) -> None:
    data = tmp_path / "heldout.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in corpus_texts(5, seed=3)) + "\n")
    out = tmp_path / "eval.json"
    models = [str(p) for p in model_dirs[:2]]
    result = run_alm_in_process(
        [
            "eval",
            *models,
            str(model_dirs[2]),
            "--data",
            str(data),
            "--json",
            str(out),
            "--max-bytes",
            "200",
        ],
        capsys,
        monkeypatch,
    )
    assert result.returncode == 0, result.stderr
    assert "bits/byte" in result.stdout and str(model_dirs[2]) in result.stdout
    report = json.loads(out.read_text())
    texts = load_eval_texts(data, max_bytes=200)
    assert report["num_texts"] == len(texts) and report["num_bytes"] == sum(
        len(t.text) for t in texts
    )
    for row, folder in zip(report["results"], model_dirs, strict=True):
        expected = score_texts(load_hf_model(str(folder)), texts)
        assert row["model"] == str(folder)
        assert row["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
        assert row["context"] == "<|endoftext|>"


def test_eval_ensemble_flag_adds_the_ensemble_row(
    model_dirs, tmp_path: Path, capsys, monkeypatch
) -> None:
    data = tmp_path / "t.txt"
    data.write_text(corpus_texts(2, seed=4)[1])
    result = run_alm_in_process(
        [
            "eval",
            *map(str, model_dirs[:2]),
            "--data",
            str(data),
            "--ensemble",
            "--combine",
            "logprobs",
        ],
        capsys,
        monkeypatch,
    )
    assert result.returncode == 0, result.stderr
    assert "ensemble(logprobs)" in result.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--data", "missing.txt"], ("missing.txt", "no such file")),
        (["--data", "x.txt", "--combine", "median"], ("--combine",)),
    ],
)
def test_eval_user_errors_exit_2(model_dirs, args, needles, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    assert_user_error(
        run_alm_in_process(["eval", str(model_dirs[0]), *args], capsys, monkeypatch), *needles
    )


def test_eval_ensemble_of_different_tokenizers_exits_2(
    model_dirs, tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "x.txt").write_text("hello there")
    result = run_alm_in_process(
        [
            "eval",
            str(model_dirs[0]),
            str(model_dirs[2]),
            "--data",
            str(tmp_path / "x.txt"),
            "--ensemble",
        ],
        capsys,
        monkeypatch,
    )
    assert_user_error(result, "share the tokenizer")
