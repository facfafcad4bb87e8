"""Tokenizer transfer (ALM_SPEC §8, FVT): each new embedding follows its rule; untying; save and reload; LoRA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from factories import (
    CHATML_SPECIALS,
    bpe_tokenizer,
    byte_tokenizer,
    corpus_texts,
    tiny_llama,
    tiny_llama_config,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from alm.errors import ConfigError
from alm.train.student import (
    _decompose,
    apply_lora,
    byte_tokenizer_like,
    save_student,
    transfer_model,
)
from alm.vocab import vocab_from_tokenizer


def teacher_model(vocab_size: int, tied: bool = False):
    if not tied:
        return tiny_llama(vocab_size, seed=3)
    config = tiny_llama_config(vocab_size)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


def test_byte_student_copies_every_byte_and_special_from_a_byte_level_teacher():
    teacher_tok = bpe_tokenizer(512)
    teacher_vocab = vocab_from_tokenizer(teacher_tok)
    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    student_tok = byte_tokenizer()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == (256 + len(CHATML_SPECIALS), old_in.shape[1])
    teacher_id = {
        b: i
        for i, b in enumerate(teacher_vocab.token_bytes)
        if b and not teacher_vocab.is_special[i]
    }
    for byte in range(256):
        tid = teacher_id[bytes([byte])]
        assert torch.equal(new_in[byte], old_in[tid])
        assert torch.equal(
            new_out[byte], old_out[tid]
        )  # untied teacher: its own output matrix is transferred
    for special in CHATML_SPECIALS:
        sid, tid = (
            student_tok.convert_tokens_to_ids(special),
            teacher_tok.convert_tokens_to_ids(special),
        )
        assert torch.equal(new_in[sid], old_in[tid])
    assert (report.num_copied, report.num_special, report.num_averaged, report.num_random) == (
        256,
        3,
        0,
        0,
    )
    assert model.config.vocab_size == len(student_tok)


def test_new_subword_tokens_average_their_decomposition_under_the_teacher():
    teacher_tok, student_tok = bpe_tokenizer(400), bpe_tokenizer(900)
    teacher_vocab, student_vocab = (
        vocab_from_tokenizer(teacher_tok),
        vocab_from_tokenizer(student_tok),
    )
    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    new_in = model.get_input_embeddings().weight.detach()
    teacher_id = {
        b: i
        for i, b in enumerate(teacher_vocab.token_bytes)
        if b and not teacher_vocab.is_special[i]
    }
    checked_avg = 0
    for sid, token in enumerate(student_vocab.token_bytes):
        if student_vocab.is_special[sid]:
            continue
        if token in teacher_id:
            assert torch.equal(new_in[sid], old_in[teacher_id[token]])
        else:
            ids = _decompose(teacher_tok, teacher_vocab, token, len(teacher_tok), teacher_id)
            assert len(ids) >= 2 and b"".join(teacher_vocab.token_bytes[i] for i in ids) == token
            torch.testing.assert_close(new_in[sid], old_in[ids].mean(dim=0))
            checked_avg += 1
    assert checked_avg == report.num_averaged > 100


def test_unmatched_special_gets_a_draw_with_the_old_mean_and_std():
    teacher_tok = bpe_tokenizer(512)
    student_tok = byte_tokenizer((*CHATML_SPECIALS, "<|new_marker|>"))
    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    assert report.num_random == 1
    row = model.get_input_embeddings().weight.detach()[
        student_tok.convert_tokens_to_ids("<|new_marker|>")
    ]
    assert torch.isfinite(row).all()
    assert not (old_in == row).all(dim=1).any()
    # Same seed, same draw.
    again = teacher_model(len(teacher_tok))
    transfer_model(again, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    assert torch.equal(again.get_input_embeddings().weight.detach()[-1], row)


def test_tied_teacher_stays_tied_or_is_untied_on_request(tmp_path):
    teacher_tok, student_tok = bpe_tokenizer(512), byte_tokenizer()
    tied = teacher_model(len(teacher_tok), tied=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    transfer_model(tied, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight

    untied = teacher_model(len(teacher_tok), tied=True)
    transfer_model(untied, teacher_tok, student_tok, untie_embeddings=True, seed=0)
    w_in, w_out = untied.get_input_embeddings().weight, untied.get_output_embeddings().weight
    assert w_out is not w_in and torch.equal(w_out, w_in)  # same start, separate parameters
    save_student(untied, student_tok, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.tie_word_embeddings is False
    assert torch.equal(reloaded.get_output_embeddings().weight, w_out.detach())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, untied.eval()(ids).logits)


def test_byte_tokenizer_like_keeps_the_teachers_special_tokens_and_roles():
    teacher_tok = bpe_tokenizer(512)
    tok = byte_tokenizer_like(teacher_tok)
    assert tok.convert_tokens_to_ids("<|im_start|>") >= 256
    assert tok.eos_token == teacher_tok.eos_token and tok.bos_token == teacher_tok.bos_token
    assert tok("ab", add_special_tokens=False)["input_ids"] == [ord("a"), ord("b")]


def test_lora_wraps_the_targets_and_trains_the_embeddings(tmp_path):
    teacher_tok = bpe_tokenizer(512)
    from alm.config.train import LoraConfig

    model = apply_lora(teacher_model(len(teacher_tok)), LoraConfig(r=4, alpha=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("embed_tokens" in n for n in trainable)
    save_student(model, teacher_tok, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.vocab_size == len(
        teacher_tok
    )
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(teacher_model(len(teacher_tok)), LoraConfig(r=4, alpha=4, targets=["nope"]))


def test_transfer_leaves_shared_tokenizers_untouched():
    teacher_tok = bpe_tokenizer(512)
    before = copy.deepcopy(teacher_tok.get_vocab())
    transfer_model(
        teacher_model(len(teacher_tok)),
        teacher_tok,
        byte_tokenizer(),
        untie_embeddings=True,
        seed=0,
    )
    assert teacher_tok.get_vocab() == before


def test_student_with_an_nfc_normalizer_is_refused_unless_stripped(tmp_path):
    import copy as _copy

    from tokenizers import normalizers

    from alm.config.train import StudentConfig
    from alm.errors import TokenizerRefusedError
    from alm.train.student import load_student

    tokenizer = _copy.deepcopy(bpe_tokenizer(512))
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()  # as Qwen2's tokenizer has
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")

    with pytest.raises(TokenizerRefusedError, match="strip_unicode_normalizer"):
        load_student(StudentConfig(model=str(tmp_path / "student")), teacher_model=None, seed=0)
    student = load_student(
        StudentConfig(model=str(tmp_path / "student"), strip_unicode_normalizer=True),
        teacher_model=None,
        seed=0,
    )
    assert student.tokenizer.backend_tokenizer.normalizer is None
    assert student.vocab.fingerprint() == vocab_from_tokenizer(bpe_tokenizer(512)).fingerprint()


# --------------------------------------------------------------------------------------------------------------
# Special tokens (issue 8 item 6): matched by exact string first, then by role; never left random.


def smollm2_like_tokenizer():
    """A locally trained byte-level BPE with SmolLM2's special-token roles: `<|endoftext|>` is only the unk
    token, `<|im_start|>` is bos, `<|im_end|>` is eos and pad."""
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(bpe_tokenizer(512).backend_tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )


def gpt2_like_tokenizer():
    """A locally trained byte-level BPE whose only special, `<|endoftext|>`, is bos, eos and unk (GPT-2)."""
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(bpe_tokenizer(700, specials=("<|endoftext|>",)).backend_tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def llama3_like_tokenizer():
    """A locally trained byte-level BPE with Llama-3's special tokens (bos `<|begin_of_text|>`, no pad)."""
    from transformers import PreTrainedTokenizerFast

    specials = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    )
    backend = copy.deepcopy(bpe_tokenizer(600, specials=specials).backend_tokenizer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    return tok


def teacher_special_strings(tokenizer) -> dict[str, int]:
    """Every special token of `tokenizer` as string -> id (named roles and added special tokens)."""
    out = {s: tokenizer.convert_tokens_to_ids(s) for s in tokenizer.all_special_tokens}
    out.update({t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
    return out


def assert_teacher_specials_copied(teacher_tok, student_tok, old_in, old_out, model) -> int:
    """Every teacher special whose string the student has as a special token has the teacher's rows; returns
    how many were checked."""
    student_specials = teacher_special_strings(student_tok)
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    checked = 0
    for text, teacher_id in teacher_special_strings(teacher_tok).items():
        if text not in student_specials:
            continue
        student_id = student_specials[text]
        assert torch.equal(new_in[student_id], old_in[teacher_id]), text
        assert torch.equal(new_out[student_id], old_out[teacher_id]), text
        checked += 1
    return checked


@pytest.mark.parametrize("student_kind", ["bytes", "bpe", "gpt2"])
def test_every_teacher_special_whose_string_the_student_has_is_copied(student_kind):
    teacher_tok = smollm2_like_tokenizer()
    student_tok = {
        "bytes": lambda: byte_tokenizer_like(teacher_tok),
        "bpe": lambda: bpe_tokenizer(900),
        "gpt2": gpt2_like_tokenizer,
    }[student_kind]()
    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    checked = assert_teacher_specials_copied(teacher_tok, student_tok, old_in, old_out, model)
    # `<|endoftext|>` (the teacher's unk) is in every one of these students
    assert checked == {"bytes": 3, "bpe": 3, "gpt2": 1}[student_kind]
    assert report.num_special_by_string == checked
    assert report.num_random == 0


def test_a_special_without_the_same_string_falls_back_to_its_role():
    # Llama-3's bos `<|begin_of_text|>` has no string match in a GPT-2 student; `<|endoftext|>` is GPT-2's bos.
    teacher_tok = llama3_like_tokenizer()
    student_tok = gpt2_like_tokenizer()
    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    assert (report.num_special_by_string, report.num_special_by_role) == (0, 1)
    new_in = model.get_input_embeddings().weight.detach()
    assert torch.equal(
        new_in[student_tok.convert_tokens_to_ids("<|endoftext|>")],
        old_in[teacher_tok.convert_tokens_to_ids("<|begin_of_text|>")],
    )


def test_real_smollm2_specials_are_copied_into_a_byte_student():
    from factories import smollm2_tokenizer

    teacher_tok = smollm2_tokenizer()
    model = tiny_llama(len(teacher_tok), seed=3, hidden=16, layers=1)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    student_tok = byte_tokenizer_like(teacher_tok)
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=True, seed=0)
    checked = assert_teacher_specials_copied(teacher_tok, student_tok, old_in, old_out, model)
    assert checked == len(teacher_special_strings(teacher_tok)) == 17
    # SmolLM2 has no single-byte token for 21 bytes (a few control characters, bytes never in UTF-8): only those
    # are drawn at random
    teacher_bytes = set(vocab_from_tokenizer(teacher_tok).token_bytes)
    missing = [b for b in range(256) if bytes([b]) not in teacher_bytes]
    assert len(missing) == 21 and report.num_random == len(missing)
    assert (report.num_copied, report.num_special_by_string) == (256 - len(missing), 17)
    end_of_text = student_tok.convert_tokens_to_ids("<|endoftext|>")
    assert torch.equal(
        model.get_input_embeddings().weight.detach()[end_of_text],
        old_in[teacher_tok.convert_tokens_to_ids("<|endoftext|>")],
    )


def test_keeping_the_teachers_special_tokens_adds_them_to_the_student_and_copies_them(tmp_path):
    from alm.train.student import with_teacher_special_tokens

    teacher_tok = llama3_like_tokenizer()
    own_tok = bpe_tokenizer(900)  # chatml specials, `<|endoftext|>` bos/eos/pad
    student_tok = with_teacher_special_tokens(own_tok, teacher_tok)
    assert own_tok.convert_tokens_to_ids("<|begin_of_text|>") != student_tok.convert_tokens_to_ids(
        "<|begin_of_text|>"
    )  # the shared tokenizer object is left alone
    teacher_specials = teacher_special_strings(teacher_tok)
    student_specials = teacher_special_strings(student_tok)
    assert set(teacher_specials) <= set(student_specials)
    assert (student_tok.bos_token, student_tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert student_tok.chat_template == teacher_tok.chat_template
    # regular text tokenizes exactly as before: only new special ids were appended
    text = corpus_texts(1, seed=3)[0]
    assert (
        student_tok(text, add_special_tokens=False)["input_ids"]
        == own_tok(text, add_special_tokens=False)["input_ids"]
    )
    assert len(student_tok) == len(own_tok) + len(teacher_specials)
    from alm.templates import family_for_tokenizer

    model = teacher_model(len(teacher_tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    report = transfer_model(model, teacher_tok, student_tok, untie_embeddings=False, seed=0)
    checked = assert_teacher_specials_copied(teacher_tok, student_tok, old_in, old_out, model)
    assert checked == report.num_special_by_string == len(teacher_specials) == 5
    assert model.config.bos_token_id == student_tok.convert_tokens_to_ids("<|begin_of_text|>")

    # the saved student keeps what transfer produced: tokenizer, specials, template, rows, ids in the config
    save_student(model, student_tok, tmp_path / "student")
    from transformers import AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded_tok.get_vocab() == student_tok.get_vocab()
    assert teacher_special_strings(reloaded_tok) == student_specials
    assert (reloaded_tok.bos_token, reloaded_tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert reloaded_tok.chat_template == teacher_tok.chat_template
    assert (
        vocab_from_tokenizer(reloaded_tok).fingerprint()
        == vocab_from_tokenizer(student_tok).fingerprint()
    )
    assert torch.equal(
        reloaded.get_input_embeddings().weight, model.get_input_embeddings().weight.detach()
    )
    assert torch.equal(
        reloaded.get_output_embeddings().weight, model.get_output_embeddings().weight.detach()
    )
    assert reloaded.config.bos_token_id == student_tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert assert_teacher_specials_copied(teacher_tok, reloaded_tok, old_in, old_out, reloaded) == 5
    assert family_for_tokenizer(teacher_tok) == "llama3"


def test_load_student_keeps_the_teachers_special_tokens_and_family_on_request(tmp_path):
    from alm.config.train import StudentConfig
    from alm.train.student import load_student

    teacher_tok = llama3_like_tokenizer()
    teacher_model(len(teacher_tok)).save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    bpe_tokenizer(900).save_pretrained(tmp_path / "own")
    transfer = {"from": str(tmp_path / "teacher"), "tokenizer": str(tmp_path / "own")}

    kept = load_student(
        StudentConfig(transfer={**transfer, "special_tokens": "teacher"}),
        teacher_model=None,
        seed=0,
    )
    # the student speaks the teacher's own (prefix-stable) template, plain documents in the teacher's family,
    # though its own tokenizer also has chatml's markers
    assert kept.family == "template:llama3"
    assert kept.tokenizer.chat_template == teacher_tok.chat_template
    assert kept.tokenizer.bos_token == "<|begin_of_text|>"
    own = load_student(StudentConfig(transfer=transfer), teacher_model=None, seed=0)
    assert own.family == "chatml"
    assert "<|begin_of_text|>" not in own.tokenizer.get_vocab()
    assert StudentConfig(transfer=transfer).transfer.special_tokens == "student"


@pytest.mark.slow
def test_student_keeping_a_llama3_teachers_specials_trains_on_its_chat_store(tmp_path):
    """End to end: a Llama-3-style teacher scores chat data; a chatml BPE student that keeps the teacher's special
    tokens renders the same Llama-3 template, trains, and is saved with those tokens."""
    from train_helpers import REPO, train_recipe, write_yaml
    from transformers import AutoTokenizer

    from alm.config import load_yaml_model
    from alm.config.train import TrainRecipe
    from alm.precompute import run_precompute
    from alm.train.log import read_metrics
    from alm.train.loop import run_train

    teacher_tok = llama3_like_tokenizer()
    teacher_model(len(teacher_tok)).save_pretrained(tmp_path / "teacher")
    teacher_tok.save_pretrained(tmp_path / "teacher")
    bpe_tokenizer(900).save_pretrained(tmp_path / "own")
    precompute_recipe = {
        "teacher": {"model": str(tmp_path / "teacher"), "device": "cpu", "dtype": "float32"},
        "data": {"spec": str(REPO / "data_specs" / "example_chat_jsonl.yaml")},
        "output": str(tmp_path / "store"),
        "max_length": 96,
        "shard_size": 8,
    }
    run_precompute(write_yaml(tmp_path / "pre.yaml", precompute_recipe), shard="0/1")
    recipe = train_recipe(
        tmp_path / "train.yaml",
        store=tmp_path / "store",
        output=tmp_path / "out",
        student={
            "transfer": {
                "from": "teacher",
                "tokenizer": str(tmp_path / "own"),
                "special_tokens": "teacher",
            },
            "max_length": 128,
        },
        loss={"kind": "alm+sft"},
        optim__steps=2,
    )
    run_train(load_yaml_model(TrainRecipe, recipe))
    values = [r["loss"] for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "student")
    assert set(teacher_special_strings(teacher_tok)) <= set(teacher_special_strings(saved))
    assert saved.bos_token == "<|begin_of_text|>"
