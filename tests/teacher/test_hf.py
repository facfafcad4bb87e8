"""The transformers backend (`alm.teacher.hf.HFTeacher`) on a tiny random Llama with a BPE tokenizer trained here.

Every value is pinned against a direct float64 computation from `model(ids).logits` of each sequence alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm.teacher.base import TeacherBackend, boundary_class_masks
from alm.teacher.hf import HFTeacher, resolve_device, resolve_dtype
from tests.factories import bpe_tokenizer, corpus_texts, tiny_llama
from tests.teacher.test_scoring import assert_close_with_inf, reference_scores
from tests.tolerance import assert_fp32_close


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = bpe_tokenizer()
    folder = tmp_path_factory.mktemp("tiny_teacher")
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def boundary_class():
    from alm.vocab import vocab_from_tokenizer

    return vocab_from_tokenizer(bpe_tokenizer()).boundary_class


@pytest.fixture(scope="module")
def sequences():
    tokenizer = bpe_tokenizer()
    texts = corpus_texts(6, seed=5)
    seqs = [
        np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:40], dtype=np.int32)
        for t in texts
    ]
    return [*seqs, np.asarray([1], dtype=np.int32), np.asarray([0, 7], dtype=np.int32)]


def direct(model_dir, token_ids: np.ndarray, boundary_class: np.ndarray, top_k: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            torch.as_tensor(token_ids[None, :], dtype=torch.long), output_hidden_states=True
        )
    logits = out.logits[0].numpy()
    masks = boundary_class_masks(boundary_class, logits.shape[1])
    return (*reference_scores(logits, token_ids, masks, top_k), out.hidden_states[-1][0].numpy())


def test_hf_teacher_scores_equal_direct_computation_per_sequence(
    teacher_dir, boundary_class, sequences
) -> None:
    # a small budget forces several batches, padding, and reordering by length
    teacher = HFTeacher(
        str(teacher_dir),
        boundary_class,
        device="cpu",
        top_k=4,
        hidden_states=True,
        token_budget=64,
        row_chunk=7,
    )
    assert isinstance(teacher, TeacherBackend)
    assert teacher.use_head_path
    results = teacher.score(sequences)
    assert len(results) == len(sequences)
    for ids, got in zip(sequences, results, strict=True):
        logp, blm, topk_id, topk_logp, hidden = direct(teacher_dir, ids, boundary_class, top_k=4)
        assert got.num_tokens == len(ids)
        assert np.isnan(got.logp[0])
        assert_fp32_close(got.logp[1:], logp[1:])
        assert_close_with_inf(got.boundary_logmass, blm)
        assert_fp32_close(got.topk_logp, topk_logp)
        np.testing.assert_array_equal(got.topk_id[:, 0], topk_id[:, 0])
        # hidden = output_hidden_states[-1] = the final-norm state the LM head reads
        assert_fp32_close(got.hidden, hidden)


def test_padding_and_batch_composition_do_not_change_scores(
    teacher_dir, boundary_class, sequences
) -> None:
    one_batch = HFTeacher(
        str(teacher_dir), boundary_class, device="cpu", token_budget=100_000
    ).score(sequences)
    singles = HFTeacher(str(teacher_dir), boundary_class, device="cpu", token_budget=1).score(
        sequences
    )
    for a, b in zip(one_batch, singles, strict=True):
        assert_fp32_close(a.logp, b.logp, equal_nan=True)
        assert_close_with_inf(a.boundary_logmass, b.boundary_logmass)


def test_final_norm_hidden_state_is_the_last_hidden_states_entry(teacher_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.arange(3, 20)[None, :]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = model.get_decoder()(ids).last_hidden_state
        torch.testing.assert_close(out.hidden_states[-1], last, rtol=0, atol=0)
        torch.testing.assert_close(model.lm_head(last), out.logits, rtol=0, atol=0)


def test_soft_capped_model_is_scored_through_the_fp32_head_and_cap(
    tmp_path, boundary_class, sequences
) -> None:
    """A model whose logits are not lm_head(decoder(x)) (soft-capping) takes the head path with its transform
    (other families and the fallback: tests/teacher/test_hf_head.py)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = bpe_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=5.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).eval().save_pretrained(tmp_path)
    teacher = HFTeacher(
        str(tmp_path), boundary_class, device="cpu", hidden_states=True, token_budget=80
    )
    assert teacher.use_head_path and teacher.logit_transform.softcap == 5.0
    for ids, got in zip(sequences[:3], teacher.score(sequences[:3]), strict=True):
        logp, blm, _, _, hidden = direct(tmp_path, ids, boundary_class)
        assert_fp32_close(got.logp[1:], logp[1:])
        assert_close_with_inf(got.boundary_logmass, blm)
        assert_fp32_close(got.hidden, hidden)


def test_teacher_records_identity(teacher_dir, boundary_class) -> None:
    teacher = HFTeacher(str(teacher_dir), boundary_class, device="cpu", model_id="my-teacher")
    assert teacher.name == "hf" and teacher.boundary_method == "exact"
    assert teacher.model_id == "my-teacher"
    assert teacher.model_revision.startswith("local-") and len(teacher.model_config_hash) == 16
    assert teacher.vocab_size == 512 and teacher.hidden_size == 32
    assert "transformers" in teacher.version


def test_auto_device_and_dtype_on_cpu() -> None:
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.gpu
def test_gpu_bf16_weights_score_close_to_fp32_cpu(teacher_dir, boundary_class, sequences) -> None:
    """On CUDA the weights are bf16 but the LM head and log-softmax run in fp32: close to the fp32 CPU scores."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpu = HFTeacher(str(teacher_dir), boundary_class, device="cuda", top_k=4, hidden_states=True)
    assert gpu.dtype == torch.bfloat16 and gpu.use_head_path
    cpu = HFTeacher(str(teacher_dir), boundary_class, device="cpu", top_k=4, hidden_states=True)
    for a, b in zip(gpu.score(sequences), cpu.score(sequences), strict=True):
        np.testing.assert_allclose(a.logp, b.logp, rtol=2.0**-7, atol=0.05, equal_nan=True)
        # bf16 weights against fp32: a bf16-scale bound, not an fp32 one
        np.testing.assert_array_equal(
            np.isneginf(a.boundary_logmass), np.isneginf(b.boundary_logmass)
        )
        finite = np.isfinite(b.boundary_logmass)
        np.testing.assert_allclose(
            a.boundary_logmass[finite], b.boundary_logmass[finite], rtol=2.0**-7, atol=0.05
        )
        assert a.hidden.dtype == np.float32
