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


@pytest.fixture(scope="module")
def template_teacher_dir(teacher_dir, tmp_path_factory) -> Path:
    """The tiny teacher whose tokenizer carries SmolLM2-Instruct's chat template (chatml markers)."""
    import shutil

    from test_chat_template_family import SMOLLM2_TEMPLATE
    from transformers import AutoTokenizer

    source = tmp_path_factory.mktemp("template_teacher") / "teacher"
    shutil.copytree(teacher_dir, source)
    teacher_tokenizer = AutoTokenizer.from_pretrained(source)
    teacher_tokenizer.chat_template = SMOLLM2_TEMPLATE
    teacher_tokenizer.save_pretrained(source)
    return source


@pytest.mark.parametrize(
    ("student_kind", "family"),
    [("bytes", "auto"), ("bpe", "auto"), ("bytes", "template")],
    ids=["bytes-auto", "bpe-auto", "bytes-template"],
)
def test_a_student_trained_with_its_template_keeps_it_and_stops_at_its_end_of_turn(
    tmp_path, chat_store, template_teacher_dir, plain_bpe_dir, student_kind, family
):
    """The student's tokenizer has the (teacher's) Jinja template, so `family: auto` renders chat with it
    (`template:chatml`), as `family: template` does; the saved tokenizer keeps that template, its eos is the
    template's end-of-turn, generation stops there, and apply_chat_template gives what training rendered (the
    template's default system prompt included), for a byte student and a BPE-transfer student."""
    from test_chat_template_family import SMOLLM2_TEMPLATE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transfer = {"from": str(template_teacher_dir), "tokenizer": "bytes"}
    if student_kind == "bpe":
        transfer = {
            "from": str(template_teacher_dir),
            "tokenizer": str(plain_bpe_dir),
            "special_tokens": "teacher",
        }
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=chat_store,
        output=tmp_path / "run",
        student={"transfer": transfer, "family": family, "max_length": 1024},
        loss={"kind": "alm+sft"},
        optim__steps=1,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    run = json.loads((tmp_path / "run" / "alm-run.json").read_text())
    assert run["student_family"] == "template:chatml"
    saved = tmp_path / "run" / "student"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert tokenizer.chat_template == SMOLLM2_TEMPLATE
    assert tokenizer.eos_token == "<|im_end|>"
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert model.generation_config.eos_token_id[0] == end_id
    vocab = vocab_from_tokenizer(tokenizer)
    checked = checked_ids = 0
    for sequence in open_store(chat_store):
        if sequence.truncated:
            continue
        document = document_from_stored(sequence)
        messages = messages_of(document)
        trained = render(document, tokenizer, vocab, "template:chatml")  # training's rendering
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert isinstance(text, str) and text.startswith("<|im_start|>system\n")
        assert text == "".join(
            tokenizer.decode(trained.token_id[s["start_pos"] : s["end_pos"]].tolist())
            if s["role"] != "text"
            else document_text(document, s)
            for s in trained.segments
        )
        literal_marker = any(
            t in m["content"] for m in messages for t in vocab.special_text.values()
        )
        if student_kind == "bytes" and not literal_marker:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert list(ids) == trained.token_id.tolist()
            checked_ids += 1
        checked += 1
    assert checked >= 3 and (checked_ids >= 2 or student_kind == "bpe")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(prompt_ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= prompt_ids.shape[1] + 3


def test_a_teacher_with_a_template_writes_chat_stores_with_it(tmp_path, template_teacher_dir):
    """Stage one under `auto`: chat data is rendered with the teacher's template (`template:chatml` in the
    manifest, its default system prompt in the first header) and `alm store verify` re-renders it exactly;
    plain-text data keeps the family's name (the same rendering, the same plan as before)."""
    from alm.precompute import run_precompute
    from alm.verify import run_verify

    families = {}
    for name, spec in [("chat", "example_chat_jsonl.yaml"), ("plain", "stdlib_docs.yaml")]:
        recipe = {
            "teacher": {
                "model": str(template_teacher_dir),
                "backend": "hf",
                "device": "cpu",
                "dtype": "float32",
            },
            "data": {"spec": str(REPO / "data_specs" / spec), "limit": 4},
            "output": str(tmp_path / name),
            "max_length": 256,
            "token_budget": 1024,
            "shard_size": 4,
        }
        run_precompute(write_yaml(tmp_path / f"{name}.yaml", recipe), shard="0/1")
        families[name] = open_store(tmp_path / name).manifest.settings["family"]
        report = run_verify(tmp_path / name)
        assert "re-tokenizes to its stored teacher ids" in report
    assert families == {"chat": "template:chatml", "plain": "chatml"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(template_teacher_dir)
    first = next(iter(open_store(tmp_path / "chat")))
    header = next(s for s in first.segments if s["role"].startswith("header:"))
    assert tokenizer.decode(first.token_id[header["start_pos"] : header["end_pos"]]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )


def test_resume_refuses_a_student_that_would_now_render_otherwise(tmp_path, stores, student_dir):
    """`family: auto` resolves from the tokenizer and its chat template, so a run records the family it trained
    with; a resume that would render otherwise (here: the student's tokenizer has gained a template) is refused,
    and resuming with `student.family` set to the recorded family continues it."""
    import shutil

    from test_chat_template_family import SMOLLM2_TEMPLATE
    from transformers import AutoTokenizer

    from alm.errors import ConfigError

    student = tmp_path / "student"
    shutil.copytree(student_dir, student)
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["plain"],
        output=tmp_path / "run",
        student={"model": str(student)},
        optim__steps=2,
        stop_after_steps=1,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    assert json.loads((tmp_path / "run" / "alm-run.json").read_text())["student_family"] == "chatml"
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    tokenizer.save_pretrained(student)
    resumed = load_yaml_model(TrainRecipe, recipe, ["stop_after_steps=null"])
    with pytest.raises(ConfigError, match="would now render with 'template:chatml'"):
        run_train(resumed, resume=True)
    pinned = load_yaml_model(
        TrainRecipe, recipe, ["stop_after_steps=null", "student.family=chatml"]
    )
    run_train(pinned, resume=True)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
