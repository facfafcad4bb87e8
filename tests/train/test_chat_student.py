"""A student trained on chat data is saved speaking its chat template (issue 10 item 5, the saving half): the
saved tokenizer's `apply_chat_template` renders exactly what training rendered, and its eos and the generation
config stop at the family's end-of-turn. Checked for a byte student and for a BPE student whose own tokenizer has
no chat specials (`special_tokens: teacher`), on a chat store written by `alm precompute` from JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import REPO, train_recipe, write_yaml

from alm.config import load_yaml_model
from alm.config.train import TrainRecipe
from alm.store.reader import open_store
from alm.templates import document_from_stored, family_chat_template, render
from alm.train.loop import run_train
from alm.vocab import vocab_from_tokenizer


@pytest.fixture(scope="module")
def chat_store(teacher_dir, tmp_path_factory) -> Path:
    from alm.precompute import run_precompute

    root = tmp_path_factory.mktemp("chat")
    recipe = {
        "teacher": {
            "model": str(teacher_dir),
            "backend": "hf",
            "device": "cpu",
            "dtype": "float32",
        },
        "data": {"spec": str(REPO / "data_specs" / "example_chat_jsonl.yaml")},
        "output": str(root / "store"),
        "max_length": 256,
        "token_budget": 1024,
        "shard_size": 4,
    }
    run_precompute(write_yaml(root / "p.yaml", recipe), shard="0/1")
    return root / "store"


def messages_of(document) -> list[dict[str, str]]:
    out, role = [], None
    for segment in document.segments:
        if segment.role.startswith("header:"):
            role = segment.role.removeprefix("header:")
        elif segment.role == "text":
            out.append({"role": role, "content": segment.text.decode()})
    return out


@pytest.fixture(scope="module")
def plain_bpe_dir(tmp_path_factory) -> Path:
    """A locally trained BPE with only `<|endoftext|>`: no chat specials of its own."""
    from factories import bpe_tokenizer

    folder = tmp_path_factory.mktemp("plain_bpe")
    bpe_tokenizer(600, specials=("<|endoftext|>",)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("student_kind", ["bytes", "bpe"])
def test_the_saved_chat_student_renders_what_training_rendered(
    tmp_path, chat_store, teacher_dir, plain_bpe_dir, student_kind
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transfer = {"from": str(teacher_dir), "tokenizer": "bytes"}
    if student_kind == "bpe":
        transfer = {
            "from": str(teacher_dir),
            "tokenizer": str(plain_bpe_dir),
            "special_tokens": "teacher",
        }
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=chat_store,
        output=tmp_path / "run",
        student={"transfer": transfer, "max_length": 1024},
        loss={"kind": "alm+sft"},
        optim__steps=1,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    saved = tmp_path / "run" / "student"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    vocab = vocab_from_tokenizer(tokenizer)
    assert tokenizer.chat_template == family_chat_template("chatml")
    assert tokenizer.eos_token == "<|im_end|>"
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((saved / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == end_id and len(generation["eos_token_id"]) == 2

    checked = checked_ids = 0
    for sequence in open_store(chat_store):
        document = document_from_stored(sequence)
        if sequence.truncated:
            continue
        trained = render(
            document, tokenizer, vocab, "chatml"
        )  # the student's rendering in training
        messages = messages_of(document)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        # the rendered blocks are zero-width: interleave them with the text, in token order
        assert text == "".join(
            tokenizer.decode(trained.token_id[s["start_pos"] : s["end_pos"]].tolist())
            if s["role"] != "text"
            else document_text(document, s)
            for s in trained.segments
        )
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        # Byte tokens never merge across a segment boundary. A special token's string typed inside a message
        # stays text in training (never a marker, ALM_SPEC §3) but is a special token to a whole-string encode.
        literal_marker = any(
            t in m["content"] for m in messages for t in vocab.special_text.values()
        )
        if student_kind == "bytes" and not literal_marker:
            assert list(ids) == trained.token_id.tolist()
            checked_ids += 1
        checked += 1
    assert checked >= 3 and (checked_ids >= 2 or student_kind == "bpe")

    # generation stops at the end-of-turn
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.generation_config.eos_token_id[0] == end_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert tokenizer.decode(prompt_ids[0]).endswith("<|im_start|>assistant\n")
    out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= prompt_ids.shape[1] + 3


def document_text(document, segment) -> str:
    return document.content_text[segment["start_byte"] : segment["end_byte"]].decode()


def test_a_student_trained_with_its_own_template_keeps_it(tmp_path, chat_store, teacher_dir):
    """`student.family: template`: the byte student renders chat with the (teacher's) Jinja template, which the
    saved tokenizer keeps, so apply_chat_template gives exactly the tokens training rendered."""
    import shutil

    from test_chat_template_family import SMOLLM2_TEMPLATE
    from transformers import AutoTokenizer

    source = tmp_path / "teacher_with_template"
    shutil.copytree(teacher_dir, source)
    teacher_tokenizer = AutoTokenizer.from_pretrained(source)
    teacher_tokenizer.chat_template = SMOLLM2_TEMPLATE
    teacher_tokenizer.save_pretrained(source)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=chat_store,
        output=tmp_path / "run",
        student={
            "transfer": {"from": str(source), "tokenizer": "bytes"},
            "family": "template",
            "max_length": 1024,
        },
        loss={"kind": "alm+sft"},
        optim__steps=1,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert tokenizer.chat_template == SMOLLM2_TEMPLATE
    vocab = vocab_from_tokenizer(tokenizer)
    checked = 0
    for sequence in open_store(chat_store):
        document = document_from_stored(sequence)
        messages = messages_of(document)
        if any(t in m["content"] for m in messages for t in vocab.special_text.values()):
            continue  # a special token's string in a message stays text in training
        trained = render(document, tokenizer, vocab, "template")
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(ids) == trained.token_id.tolist()
        checked += 1
    assert checked >= 2
