"""`alm precompute` end to end on a tiny random Llama with a BPE tokenizer trained here (`alm.precompute`).

The store's values are pinned against a direct float64 computation from the model's logits; sharding, resume
after a real `kill -9`, and every bad input (exit code 2, one message, nothing that looks finished) are checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from alm.errors import StoreError, TokenizerRefusedError
from alm.precompute import parse_shard, run_precompute
from alm.store.reader import open_store
from tests.factories import TRICKY_TEXTS, bpe_tokenizer, corpus_texts, tiny_llama
from tests.teacher.test_scoring import reference_scores
from tests.test_cli import assert_user_error, run_alm, run_alm_in_process
from tests.tolerance import assert_fp32_close, fp32_tolerance

MAX_LENGTH = 48
TOP_K = 3


def fp16_tolerance(reference: np.ndarray) -> np.ndarray:
    """Storing in float16 rounds to nearest: |error| <= half an ulp (2^-11 relative) plus the fp32 tolerance."""
    return fp32_tolerance(reference) + np.abs(reference) * 2.0**-11


def bf16_tolerance(reference: np.ndarray) -> np.ndarray:
    return fp32_tolerance(reference) + np.abs(reference) * 2.0**-8


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = bpe_tokenizer()
    folder = tmp_path_factory.mktemp("teacher")
    tiny_llama(len(tokenizer), seed=11).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 plain documents (one empty, one whitespace-only, one far longer than max_length) and 3 dialogues."""
    folder = tmp_path_factory.mktemp("data")
    texts = [*corpus_texts(8, seed=2), *TRICKY_TEXTS[3:6], "", "   \n", "long " * 400]
    with (folder / "plain.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    dialogues = [
        [("user", "What is 2+2?"), ("assistant", "It is 4.")],
        [("system", "Be brief."), ("user", "Name a prime."), ("assistant", "Seven.\n")],
        [("user", "Say hi in Japanese."), ("assistant", "こんにちは")],
    ]
    with (folder / "chat.jsonl").open("w") as f:
        for turns in dialogues:
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    spec = {
        "name": "tiny_mixed",
        "split": "all",
        "sources": [
            {"type": "jsonl", "path": str(folder / "plain.jsonl"), "name": "plain"},
            {"type": "jsonl", "path": str(folder / "chat.jsonl"), "name": "chat", "kind": "chat"},
        ],
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder


def write_recipe(folder: Path, teacher: Path, spec: Path | dict, output: Path, **extra) -> Path:
    recipe = {
        "teacher": {"model": str(teacher), "device": "cpu"},
        "data": {"spec": spec if isinstance(spec, dict) else str(spec)},
        "output": str(output),
        "max_length": MAX_LENGTH,
        "token_budget": 160,
        "row_chunk": 16,
        "top_k": TOP_K,
        "hidden_states": True,
        "shard_size": 4,
        "precision": "exact",  # values compared with direct computation; `compact`: tests/store/test_store_precision.py
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, teacher_dir, data_dir) -> tuple[Path, Path, str]:
    """One uninterrupted single-worker run: (recipe path, store path, its printed summary)."""
    folder = tmp_path_factory.mktemp("run")
    recipe = write_recipe(folder, teacher_dir, data_dir / "spec.yaml", folder / "store")
    message = run_precompute(recipe)
    return recipe, folder / "store", message


def read_everything(store_path: Path) -> tuple[dict, list]:
    """Every array of every shard, and every index table, as plain Python/NumPy values."""
    store = open_store(store_path)
    arrays, indexes = {}, []
    for shard in store.iter_shards():
        for name, values in shard.arrays.items():
            arrays[(shard.shard_index, name)] = np.asarray(values)
        indexes.append(shard.index.to_pylist())
    return arrays, indexes


def assert_same_store(a: Path, b: Path) -> None:
    arrays_a, index_a = read_everything(a)
    arrays_b, index_b = read_everything(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        # byte-identical, NaNs included
        assert arrays_a[key].tobytes() == arrays_b[key].tobytes(), key
    assert index_a == index_b


def test_store_values_equal_direct_computation(reference_store, teacher_dir) -> None:
    from transformers import AutoModelForCausalLM

    from alm.vocab import vocab_from_tokenizer

    _, store_path, message = reference_store
    assert "is finished" in message and str(store_path) in message
    store = open_store(store_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab = vocab_from_tokenizer(bpe_tokenizer())
    assert store.manifest.tokenizer_fingerprint == vocab.fingerprint()
    masks = vocab.boundary_class[None, :] == np.arange(5)[:, None]
    sequences = list(store)
    # 17 documents, 2 empty ones skipped, ids in document order
    assert [s.seq_id for s in sequences] == list(range(15))
    assert {s.source for s in sequences} == {"plain", "chat"}
    for seq in sequences:
        with torch.no_grad():
            out = model(
                torch.as_tensor(seq.token_id[None, :], dtype=torch.long), output_hidden_states=True
            )
        logp, blm, topk_id, topk_logp = reference_scores(
            out.logits[0].numpy(), seq.token_id, masks, TOP_K
        )
        assert np.isnan(seq.logp[0])
        assert_fp32_close(seq.logp[1:], logp[1:])  # float32 in the store
        assert seq.boundary_logmass.shape == (seq.num_tokens, 5)  # last position included
        finite = np.isfinite(blm)
        assert np.array_equal(np.isfinite(seq.boundary_logmass), finite)
        assert np.all(
            np.abs(seq.boundary_logmass[finite] - blm[finite]) <= fp16_tolerance(blm[finite])
        )
        np.testing.assert_array_equal(seq.topk_id[:, 0], topk_id[:, 0])
        assert np.all(np.abs(seq.topk_logp - topk_logp) <= fp16_tolerance(topk_logp))
        hidden = out.hidden_states[-1][0].numpy()
        assert np.all(np.abs(seq.hidden_float32() - hidden) <= bf16_tolerance(hidden))


def test_store_records_text_segments_and_truncation(reference_store, data_dir) -> None:
    from alm.data.specs import iter_documents, load_data_spec
    from alm.templates import render
    from alm.vocab import vocab_from_tokenizer

    _, store_path, _ = reference_store
    tokenizer = bpe_tokenizer()
    vocab = vocab_from_tokenizer(tokenizer)
    documents = list(iter_documents(load_data_spec(data_dir / "spec.yaml")))
    stored = list(open_store(store_path))
    assert len(stored) == len(documents)
    for doc, seq in zip(documents, stored, strict=True):
        expected = render(doc, tokenizer, vocab, max_length=MAX_LENGTH)
        assert seq.doc_id == doc.doc_id and seq.row == doc.row
        np.testing.assert_array_equal(seq.token_id, expected.token_id)
        assert seq.text == expected.text and seq.truncated == expected.truncated
        assert seq.segments == expected.segments
        np.testing.assert_array_equal(seq.loss_spans, expected.loss_spans)
        assert seq.num_tokens <= MAX_LENGTH
    long_doc = next(s for s in stored if s.text.startswith(b"long long"))
    assert long_doc.truncated and long_doc.num_tokens == MAX_LENGTH
    assert b"long " * 10 in long_doc.text and len(long_doc.text) < len(b"long " * 400)
    assert all(s.num_tokens == MAX_LENGTH for s in stored if s.truncated)
    assert not all(s.truncated for s in stored)
    chat = [s for s in stored if s.source == "chat"]
    assert chat and all(any(seg["role"] == "header:assistant" for seg in s.segments) for s in chat)
    # A stored dialogue ends on its final end-of-turn, with no eos after it (ALM_SPEC §3, issue 8 item 3).
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for seq in chat:
        assert not seq.truncated and seq.segments[-1]["role"] == "eot"
        assert seq.token_id[-len(end_of_turn) :].tolist() == end_of_turn
    manifest = open_store(store_path).manifest
    assert manifest.max_length == MAX_LENGTH and manifest.top_k == TOP_K
    assert manifest.backend == "hf" and manifest.boundary_method == "exact"
    assert (store_path / "vocab" / "tokenizer" / "tokenizer.json").is_file()


def test_store_is_identical_whatever_the_number_of_workers(reference_store, tmp_path) -> None:
    recipe, store_path, _ = reference_store
    other = tmp_path / "store"
    messages = [
        run_precompute(recipe, overrides=[f"output={other}"], shard=f"{i}/3") for i in (2, 0, 1)
    ]
    assert "not finished yet" in messages[0] and "not finished yet" in messages[1]
    assert "is finished" in messages[2]
    assert_same_store(store_path, other)
    # the store card names the command of the first worker (shard 2/3), which wrote the plan
    card = (other / "README.md").read_text()
    assert f"alm precompute {recipe} --set output={other} --shard 2/3" in card
    assert "each worker ran this command with its own `--shard i/N`" in card


def test_rerun_of_a_finished_store_recomputes_nothing(reference_store) -> None:
    recipe, store_path, _ = reference_store
    before = (store_path / "alm-store.json").read_bytes()
    message = run_precompute(recipe)
    assert "already written" in message
    assert (
        json.loads((store_path / "alm-store.json").read_bytes())["shards"]
        == json.loads(before)["shards"]
    )


SLOW_TEACHER = """
import sys, time
from alm.teacher import hf
score = hf.HFTeacher.score
hf.HFTeacher.score = lambda self, batch: (time.sleep(0.4), score(self, batch))[1]
from alm.cli import main
sys.argv = ["alm", "precompute", sys.argv[1]]
main()
"""


def test_resume_after_kill_9_equals_uninterrupted_run(reference_store, tmp_path) -> None:
    """A real `alm precompute` process (teacher slowed so the kill lands mid-run) is killed with SIGKILL after
    its first shard is committed; rerunning the same command finishes a store identical to an uninterrupted one."""
    recipe, store_path, _ = reference_store
    resumed = tmp_path / "store"
    data = yaml.safe_load(recipe.read_text())
    data["output"] = str(resumed)
    killed_recipe = tmp_path / "recipe.yaml"
    killed_recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TEACHER, str(killed_recipe)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (resumed / "shards" / "shard-00000" / "shard.json").exists():
            assert proc.poll() is None, "precompute ended before it could be killed"
            assert time.monotonic() < deadline, "no shard committed in time"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next shard
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (resumed / "alm-store.json").exists()
    with pytest.raises(StoreError):
        open_store(resumed)  # an unfinished store does not open as finished
    done_before = sorted(
        p.name for p in (resumed / "shards").iterdir() if (p / "shard.json").exists()
    )
    assert 1 <= len(done_before) < 4
    message = run_precompute(killed_recipe)
    assert "is finished" in message
    assert not [p for p in (resumed / "shards").iterdir() if p.name.startswith(".tmp")]
    assert_same_store(store_path, resumed)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear message, exit code 2, nothing that looks finished


def assert_no_finished_store(path: Path) -> None:
    assert not (path / "alm-store.json").exists()


def test_all_empty_corpus_is_an_error(tmp_path, teacher_dir, capsys, monkeypatch) -> None:
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    spec = {
        "name": "empties",
        "split": "all",
        "sources": [{"type": "jsonl", "path": str(tmp_path / "empty.jsonl")}],
    }
    recipe = write_recipe(tmp_path, teacher_dir, spec, tmp_path / "store")
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "no non-empty document", "empties")
    assert not (tmp_path / "store").exists()


def test_invalid_utf8_text_file_is_an_error(tmp_path, teacher_dir, capsys, monkeypatch) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text("fine text\n")
    (texts / "bad.txt").write_bytes(b"caf\xc3 broken \xff\xfe bytes\n")
    spec = {"name": "bad_utf8", "split": "all", "sources": [{"type": "text", "path": str(texts)}]}
    recipe = write_recipe(tmp_path, teacher_dir, spec, tmp_path / "store")
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "bad.txt", "UTF-8")
    assert not (tmp_path / "store").exists()


def test_missing_data_file_is_an_error(tmp_path, teacher_dir, capsys, monkeypatch) -> None:
    spec = {
        "name": "missing",
        "sources": [{"type": "jsonl", "path": str(tmp_path / "nowhere.jsonl")}],
    }
    recipe = write_recipe(tmp_path, teacher_dir, spec, tmp_path / "store")
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "nowhere.jsonl")
    assert not (tmp_path / "store").exists()


def test_missing_data_spec_file_is_an_error(tmp_path, teacher_dir, capsys, monkeypatch) -> None:
    recipe = write_recipe(tmp_path, teacher_dir, tmp_path / "no_spec.yaml", tmp_path / "store")
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "no_spec.yaml", "not found")


def _wordpiece_teacher(folder: Path) -> Path:
    """A BERT-style WordPiece tokenizer with lower-casing, trained here: it cannot reproduce exact bytes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    )
    tok.train_from_iterator(corpus_texts(50), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
    )
    hf.save_pretrained(folder)
    tiny_llama(len(hf), seed=0).save_pretrained(folder)
    return folder


def test_refused_tokenizer_is_an_error_before_anything_is_written(
    tmp_path, data_dir, capsys, monkeypatch
) -> None:
    teacher = _wordpiece_teacher(tmp_path / "wordpiece")
    recipe = write_recipe(tmp_path, teacher, data_dir / "spec.yaml", tmp_path / "store")
    with pytest.raises(TokenizerRefusedError):
        run_precompute(recipe)
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "wordpiece")
    assert not (tmp_path / "store").exists()


def test_untokenizable_document_stops_before_writing_or_is_skipped_on_request(
    tmp_path, capsys, monkeypatch
) -> None:
    from tests.factories import SENTENCEPIECE_UNSAFE_TEXT, sentencepiece_tokenizer

    teacher = tmp_path / "sp_teacher"
    tokenizer = sentencepiece_tokenizer()
    tokenizer.save_pretrained(teacher)
    tiny_llama(len(tokenizer), seed=0).save_pretrained(teacher)
    texts = ["A fine first document.", SENTENCEPIECE_UNSAFE_TEXT, "A fine third one."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = {
        "name": "unsafe",
        "split": "all",
        "sources": [{"type": "jsonl", "path": str(tmp_path / "docs.jsonl")}],
    }
    recipe = write_recipe(tmp_path, teacher, spec, tmp_path / "store", hidden_states=False, top_k=0)
    result = run_alm_in_process(["precompute", str(recipe)], capsys, monkeypatch)
    assert_user_error(result, "skip_untokenizable")
    assert not (tmp_path / "store").exists()  # refused before the store or the model

    run_precompute(recipe, overrides=["skip_untokenizable=true"])
    store = open_store(tmp_path / "store")
    assert store.num_sequences == 2
    assert sorted(seq.text for seq in store) == sorted(
        t.encode() for t in texts if "\u2581" not in t
    )


def test_foreign_output_folder_is_refused_even_with_overwrite(
    tmp_path, teacher_dir, data_dir
) -> None:
    out = tmp_path / "not_a_store"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    recipe = write_recipe(tmp_path, teacher_dir, data_dir / "spec.yaml", out)
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not an alm teacher store"):
            run_precompute(recipe, overwrite=overwrite)
    assert (out / "precious.txt").read_text() == "keep me"


def test_store_with_other_settings_needs_overwrite(reference_store, tmp_path) -> None:
    recipe, store_path, _ = reference_store
    copy = tmp_path / "store"
    run_precompute(recipe, overrides=[f"output={copy}", "data.limit=5"])
    with pytest.raises(StoreError, match="different settings"):
        run_precompute(recipe, overrides=[f"output={copy}"])
    message = run_precompute(recipe, overrides=[f"output={copy}"], overwrite=True)
    assert "is finished" in message
    assert_same_store(store_path, copy)


def test_cli_bad_data_exits_2_through_the_entry_point(tmp_path, teacher_dir) -> None:
    spec = {
        "name": "missing",
        "sources": [{"type": "jsonl", "path": str(tmp_path / "nowhere.jsonl")}],
    }
    recipe = write_recipe(tmp_path, teacher_dir, spec, tmp_path / "store")
    assert_user_error(run_alm("precompute", str(recipe)), "nowhere.jsonl")
    assert_no_finished_store(tmp_path / "store")


def test_parse_shard() -> None:
    assert parse_shard("2/5").worker == 2 and parse_shard("2/5").num_workers == 5
    for bad in ("5/5", "-1/2", "a/b", "3", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


# ---------------------------------------------------------------------------------------------------------------
# The real default teacher (slow tier)


@pytest.mark.slow
def test_demo_recipe_with_smollm2_matches_direct_computation(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from alm.teacher.default import resolve_teacher_path

    repo = Path(__file__).resolve().parents[1]
    message = run_precompute(
        repo / "stages" / "demo_precompute.yaml",
        overrides=[
            f"output={tmp_path / 'store'}",
            "data.limit=6",
            "shard_size=3",
            "max_length=64",
            "precision=exact",
        ],
    )
    assert "is finished" in message
    store = open_store(tmp_path / "store")
    assert (
        store.num_sequences == 6 and store.manifest.teacher_model == "builtin:smollm2-135m-instruct"
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_teacher_path("builtin:smollm2-135m-instruct")
    ).eval()
    masks = store.vocab.boundary_class[None, :] == np.arange(5)[:, None]
    for seq in list(store)[:3]:
        with torch.no_grad():
            logits = (
                model(torch.as_tensor(seq.token_id[None, :], dtype=torch.long)).logits[0].numpy()
            )
        logp, blm, _, _ = reference_scores(logits, seq.token_id, masks)
        assert_fp32_close(seq.logp[1:], logp[1:], ulps=256, scale=8.0)  # 49k-wide fp32 reductions
        finite = np.isfinite(blm)
        assert np.all(
            np.abs(seq.boundary_logmass[finite] - blm[finite])
            <= 1e-4 + np.abs(blm[finite]) * 2.0**-11
        )
