"""Byte students with n-gram input embeddings (paper App. C, ALM_SPEC §8 `expand_input_ids`).

The look-up is checked against a brute-force reference written from the definition (the longest teacher subword
whose bytes end at the byte, at most 16 bytes back, never across a special token); the saved student loads with
plain transformers (`trust_remote_code=True`) and gives the training-time log-probs, also step by step through a
KV cache; and `alm train` trains and saves such a student.
"""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import train_recipe

from alm.config import load_yaml_model
from alm.config.train import StudentConfig, TrainRecipe
from alm.train.log import read_metrics
from alm.train.loop import run_train
from alm.train.ngram_model import AlmNgramLlamaForCausalLM, NgramEmbedding
from alm.train.student import load_student, save_student
from tests.tolerance import assert_fp32_close


def _byte_student(teacher_dir):
    cfg = StudentConfig(
        transfer={  # pyright: ignore[reportArgumentType]
            "from": str(teacher_dir),
            "tokenizer": "bytes",
            "untie_embeddings": True,
            "ngram_embeddings": True,
        }
    )
    return load_student(cfg, teacher_model=None, seed=0)


def reference_ngram_ids(
    student_bytes: list[bytes], special: list[bool], ids: list[int], teacher: list[bytes]
) -> list[int]:
    """Per position: the teacher id (lowest on equal bytes) of the longest token equal to the bytes ending there."""
    out = []
    for i, token in enumerate(ids):
        if special[token]:
            out.append(-1)
            continue
        start = i
        while start > 0 and not special[ids[start - 1]] and i - start + 1 < 16:
            start -= 1
        text = b"".join(student_bytes[t] for t in ids[start : i + 1])
        best, best_len = -1, 0
        for tid, tb in enumerate(teacher):
            if tb and len(tb) <= 16 and text.endswith(tb) and len(tb) > best_len:
                best, best_len = tid, len(tb)
        out.append(best)
    return out


def test_ngram_ids_are_the_longest_teacher_subword_ending_at_each_byte(teacher_dir):
    student = _byte_student(teacher_dir)
    from alm.train.student import load_tokenizer
    from alm.vocab import vocab_from_tokenizer

    teacher_vocab = vocab_from_tokenizer(load_tokenizer(str(teacher_dir)))
    teacher = [
        b"" if teacher_vocab.is_special[i] else tb for i, tb in enumerate(teacher_vocab.token_bytes)
    ]
    embedding = student.model.get_input_embeddings()
    assert isinstance(embedding, NgramEmbedding)
    text = "def expand(self):\n    return the longest subword, été 🙂 <|im_end|>"
    ids = student.tokenizer(text, add_special_tokens=False)["input_ids"]
    special = [bool(x) for x in student.vocab.is_special]
    assert any(special[t] for t in ids)  # a special token cuts the look-back
    got = embedding.ngram_ids(torch.tensor([ids]))[0].tolist()
    want = reference_ngram_ids(list(student.vocab.token_bytes), special, ids, teacher)
    assert got == want
    assert max(len(teacher[t]) for t in got if t >= 0) >= 3  # real multi-byte matches happen


def test_saved_ngram_student_loads_with_plain_transformers_and_gives_the_training_logprobs(
    teacher_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = _byte_student(teacher_dir)
    model = student.model
    assert isinstance(model, AlmNgramLlamaForCausalLM)
    # the n-gram table is frozen: a buffer, not a parameter the optimizer sees
    assert not any("ngram" in name for name, _ in model.named_parameters())
    with torch.no_grad():  # train a little so the saved weights differ from the transfer's
        model.model.embed_tokens.weight.add_(
            0.01 * torch.randn_like(model.model.embed_tokens.weight)
        )
    save_student(model, student.tokenizer, tmp_path / "student")
    assert (tmp_path / "student" / "ngram_model.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", trust_remote_code=True, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student", trust_remote_code=True)
    ids = torch.tensor(
        [tokenizer("The longest subword ends here.", add_special_tokens=False)["input_ids"]]
    )
    model.eval()
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits, -1)
        got = torch.log_softmax(loaded(input_ids=ids).logits, -1)
        assert torch.equal(got, want)
        # step by step through the KV cache: the embedding continues the look-back across calls
        out = loaded(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, ids.shape[1]):
            out = loaded(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        incremental = torch.log_softmax(torch.cat(steps, 1), -1)
    assert_fp32_close(
        incremental.numpy(), got.numpy(), ulps=256
    )  # cached attention sums in another order
    from alm.eval.models import load_hf_model

    assert load_hf_model(str(tmp_path / "student")) is not None  # `alm eval` loads it too
    generated = loaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    uncached = loaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert generated.tolist() == uncached.tolist()


def test_alm_train_trains_and_saves_a_byte_student_with_ngram_embeddings(
    tmp_path, stores, teacher_dir
):
    recipe = train_recipe(
        tmp_path / "r.yaml",
        store=stores["heldout"],
        output=tmp_path / "out",
        student={
            "transfer": {
                "from": "teacher",
                "tokenizer": "bytes",
                "untie_embeddings": True,
                "ngram_embeddings": True,
            },
            "max_length": 160,
        },
        loss={"kind": "alm+sft"},
        optim__steps=3,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    values = [r["loss"] for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(values) == 3 and all(math.isfinite(v) for v in values)
    assert (tmp_path / "out" / "student" / "ngram_model.py").is_file()


@pytest.mark.parametrize("tokenizer", ["some/other-tokenizer"])
def test_ngram_embeddings_need_a_byte_student(tokenizer):
    with pytest.raises(ValueError, match="ngram_embeddings needs a byte student"):
        StudentConfig(
            transfer={"tokenizer": tokenizer, "ngram_embeddings": True}  # pyright: ignore[reportArgumentType]
        )


def test_ngram_student_under_lora_trains_its_byte_table_and_saves_a_merged_ngram_student(
    teacher_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    from alm.config.train import LoraConfig
    from alm.train.student import apply_lora

    student = _byte_student(teacher_dir)
    ids = torch.tensor([student.tokenizer("LoRA wraps the n-gram embedding.")["input_ids"]])
    lora_model = apply_lora(student.model, LoraConfig(r=4, alpha=8))
    # peft wraps embed_tokens (the trained copy, ALM_SPEC §8): the forward still finds the n-gram embedding
    lora_model(input_ids=ids).logits.sum().backward()
    grads = {n: p.grad for n, p in lora_model.named_parameters() if p.requires_grad}
    byte_table = [n for n in grads if "embed_tokens" in n and "modules_to_save" in n]
    assert byte_table and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in byte_table)
    with torch.no_grad():
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.02 * torch.randn_like(param))
        want = torch.log_softmax(lora_model(input_ids=ids).logits, -1)
    save_student(lora_model, student.tokenizer, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "student", trust_remote_code=True, dtype=torch.float32
    ).eval()
    assert isinstance(loaded.get_input_embeddings(), torch.nn.Module)
    assert type(loaded.get_input_embeddings()).__name__ == "NgramEmbedding"
    with torch.no_grad():
        got = torch.log_softmax(loaded(input_ids=ids).logits, -1)
    assert_fp32_close(got.numpy(), want.numpy(), ulps=256, scale=10.0)  # merged LoRA: other order
