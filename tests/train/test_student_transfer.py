"""Tokenizer transfer (ALM_SPEC §8, FVT): each new embedding follows its rule; untying; save and reload; LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import CHATML_SPECIALS, bpe_tokenizer, byte_tokenizer, tiny_llama, tiny_llama_config
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
