"""The HF backend's fp32 head path for model families that transform the logits after the LM head (issue 8 item 7).

Gemma 2/3 soft-cap (`cap * tanh(logits / cap)`), Cohere multiplies by `logit_scale`, Granite divides by
`logits_scaling`. The backend applies head + transform in fp32; here each family's tiny random model is pinned
against its own fp32 `model(ids).logits` (float64 reference from the definitions), and a bf16 Gemma 2 on CPU stands
in for the GPU case: fp32 head + cap on the bf16 trunk's hidden state must equal the float64 head + cap on that
state, and be closer to the fp32 model than the bf16 logits are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm.teacher.base import boundary_class_masks
from alm.teacher.hf import HFTeacher, logit_transform_of
from alm.teacher.scoring import LogitTransform
from alm.vocab import vocab_from_tokenizer
from tests.factories import bpe_tokenizer, corpus_texts
from tests.teacher.test_scoring import assert_close_with_inf, reference_scores
from tests.tolerance import assert_fp32_close

# Raw logits of a random tiny model are ~0.5; real Gemma 2 logits reach the cap (30). The shared embedding / head
# matrix is scaled so that the transforms act on realistic magnitudes (raw logits up to ~60).
HEAD_SCALE = 120.0


def tiny_model(family: str, vocab_size: int):
    """A tiny random causal LM of `family` in fp32, with its logit transform active at realistic magnitudes."""
    import transformers as tf

    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    config, model_class = {
        "gemma2": (lambda: tf.Gemma2Config(**common), tf.Gemma2ForCausalLM),  # cap 30
        "gemma3": (
            lambda: tf.Gemma3TextConfig(**common, final_logit_softcapping=30.0),
            tf.Gemma3ForCausalLM,
        ),
        "cohere": (lambda: tf.CohereConfig(**common, logit_scale=0.25), tf.CohereForCausalLM),
        "granite": (lambda: tf.GraniteConfig(**common, logits_scaling=3.0), tf.GraniteForCausalLM),
    }[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = model_class(config()).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    return model.to(torch.float32)


@pytest.fixture(scope="module")
def boundary_class():
    return vocab_from_tokenizer(bpe_tokenizer()).boundary_class


@pytest.fixture(scope="module")
def sequences():
    tokenizer = bpe_tokenizer()
    return [
        np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:48], dtype=np.int32)
        for t in corpus_texts(4, seed=11)
    ]


def model_logits(model, ids: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(ids[None, :], dtype=torch.long)).logits[0]


EXPECTED_TRANSFORM = {
    "gemma2": LogitTransform(softcap=30.0),
    "gemma3": LogitTransform(softcap=30.0),
    "cohere": LogitTransform(multiply=0.25),
    "granite": LogitTransform(divide=3.0),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_TRANSFORM))
def test_fp32_head_path_reproduces_each_familys_own_logits(
    family, tmp_path, boundary_class, sequences
) -> None:
    model = tiny_model(family, len(bpe_tokenizer()))
    model.save_pretrained(tmp_path)
    teacher = HFTeacher(str(tmp_path), boundary_class, device="cpu", top_k=3, token_budget=100)
    assert teacher.logit_transform == EXPECTED_TRANSFORM[family] == logit_transform_of(model.config)
    assert teacher.use_head_path
    masks = boundary_class_masks(boundary_class, teacher.vocab_size)
    for ids, got in zip(sequences, teacher.score(sequences), strict=True):
        logits = model_logits(model, ids)
        with torch.no_grad():
            hidden = model.get_decoder()(torch.as_tensor(ids[None, :], dtype=torch.long))
            raw = model.get_output_embeddings()(hidden.last_hidden_state)[0]
        # the transform really acts here: the plain head's logits are far from the model's
        assert float((raw - logits).abs().max()) > 1.0
        # the backend's fp32 logits are the model's own fp32 logits, in ulps of their magnitude
        with torch.inference_mode():
            head_logits = teacher._lm_head(hidden.last_hidden_state[0]).clone()
        assert_fp32_close(head_logits, logits, scale=30)
        logp, blm, topk_id, topk_logp = reference_scores(logits.numpy(), ids, masks, top_k=3)
        assert_fp32_close(got.logp[1:], logp[1:], scale=30)
        assert_close_with_inf(got.boundary_logmass, blm, scale=30)
        assert_fp32_close(got.topk_logp, topk_logp, scale=30)
        np.testing.assert_array_equal(got.topk_id[:, 0], topk_id[:, 0])


def test_probe_refuses_a_transform_that_does_not_reproduce_the_logits(
    tmp_path, boundary_class
) -> None:
    tiny_model("gemma2", len(bpe_tokenizer())).save_pretrained(tmp_path)
    teacher = HFTeacher(str(tmp_path), boundary_class, device="cpu")
    head = teacher.model.get_output_embeddings()
    assert teacher._probe_head_path(head)
    for wrong in (LogitTransform(), LogitTransform(softcap=29.0), LogitTransform(multiply=1.5)):
        teacher.logit_transform = wrong
        assert not teacher._probe_head_path(head), wrong


def test_full_logits_fallback_scores_a_soft_capped_model_exactly(
    tmp_path, boundary_class, sequences
) -> None:
    """The path taken when the probe fails (an unknown transform): scores from `model(...).logits`."""
    model = tiny_model("gemma2", len(bpe_tokenizer()))
    model.save_pretrained(tmp_path)
    teacher = HFTeacher(str(tmp_path), boundary_class, device="cpu", token_budget=100)
    teacher.use_head_path = False
    masks = boundary_class_masks(boundary_class, teacher.vocab_size)
    for ids, got in zip(sequences, teacher.score(sequences), strict=True):
        logp, blm, _, _ = reference_scores(model_logits(model, ids).numpy(), ids, masks)
        assert_fp32_close(got.logp[1:], logp[1:], scale=30)
        assert_close_with_inf(got.boundary_logmass, blm, scale=30)


def test_logit_transform_is_read_from_text_configs_and_ignores_other_models() -> None:
    from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig

    assert logit_transform_of(LlamaConfig()) == LogitTransform()
    assert (
        logit_transform_of(Gemma3TextConfig()) == LogitTransform()
    )  # Gemma 3 dropped the cap by default
    nested = Gemma3Config(text_config={"final_logit_softcapping": 30.0})
    assert logit_transform_of(nested) == LogitTransform(softcap=30.0)


def bf16_scores_from_model_logits(model_bf16, ids: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """What the backend did before this fix on GPU: logp from the bf16 model's (bf16, soft-capped) logits."""
    logits = model_logits(model_bf16, ids).to(torch.float32).numpy()
    return reference_scores(logits, ids, masks)[0]


def test_bf16_gemma2_is_scored_from_an_fp32_head_and_cap_closer_to_the_fp32_model(
    tmp_path, boundary_class, sequences
) -> None:
    """CPU stand-in for the GPU case: bf16 weights, bf16 trunk; the head and the soft-cap run in fp32."""
    from transformers import AutoModelForCausalLM

    fp32_model = tiny_model("gemma2", len(bpe_tokenizer()))
    fp32_model.save_pretrained(tmp_path)
    teacher = HFTeacher(str(tmp_path), boundary_class, device="cpu", dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16 and teacher.use_head_path
    bf16_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    head_fp64 = bf16_model.get_output_embeddings().weight.detach().to(torch.float64)  # [V, d]
    masks = boundary_class_masks(boundary_class, teacher.vocab_size)
    errors_fp32_head, errors_bf16_logits, rounding_bf16_logits = [], [], []
    for ids, got in zip(sequences, teacher.score(sequences), strict=True):
        with torch.no_grad():
            hidden = bf16_model.get_decoder()(
                torch.as_tensor(ids[None, :], dtype=torch.long)
            ).last_hidden_state[0]  # [T, d] bf16: the trunk's final-norm state
        # reference: float64 head and cap on that same bf16 hidden state
        logits_ref = 30.0 * torch.tanh((hidden.to(torch.float64) @ head_fp64.T) / 30.0)
        logp_ref, blm_ref, _, _ = reference_scores(logits_ref.numpy(), ids, masks)
        assert_fp32_close(got.logp[1:], logp_ref[1:], scale=30)
        assert_close_with_inf(got.boundary_logmass, blm_ref, scale=30)
        # and against the fp32 model: closer than scoring the bf16 logits
        logp_fp32 = reference_scores(model_logits(fp32_model, ids).numpy(), ids, masks)[0]
        logp_bf16 = bf16_scores_from_model_logits(bf16_model, ids, masks)
        errors_fp32_head.append(np.abs(got.logp[1:] - logp_fp32[1:]))
        errors_bf16_logits.append(np.abs(logp_bf16[1:] - logp_fp32[1:]))
        rounding_bf16_logits.append(np.abs(logp_bf16[1:] - logp_ref[1:]))
    fp32_head, bf16_logits = np.concatenate(errors_fp32_head), np.concatenate(errors_bf16_logits)
    rounding = np.concatenate(rounding_bf16_logits)
    print(
        f"\nbf16 Gemma2, |Δlogp| per token against the fp32 model: bf16 logits mean {bf16_logits.mean():.4f} "
        f"max {bf16_logits.max():.4f}; fp32 head + cap mean {fp32_head.mean():.4f} max {fp32_head.max():.4f}. "
        f"Rounding of the bf16 head + cap alone (same hidden state): mean {rounding.mean():.4f} max "
        f"{rounding.max():.4f}"
    )
    # the bf16 trunk's own error stays; what the bf16 head and cap added is gone
    assert fp32_head.mean() < bf16_logits.mean() and np.median(fp32_head) < np.median(bf16_logits)
    assert rounding.mean() > 0.01  # the bf16 head + cap did round by that much: the test can fail


@pytest.mark.gpu
def test_gpu_bf16_gemma2_takes_the_fp32_head_path_closer_to_fp32_than_its_bf16_logits(
    tmp_path, boundary_class, sequences
) -> None:
    """On CUDA (bf16 weights) the probe must pass bit for bit and the fp32 head + cap must beat bf16 logits."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from transformers import AutoModelForCausalLM

    fp32_model = tiny_model("gemma2", len(bpe_tokenizer()))
    fp32_model.save_pretrained(tmp_path)
    gpu = HFTeacher(str(tmp_path), boundary_class, device="cuda")
    assert gpu.dtype == torch.bfloat16 and gpu.use_head_path
    bf16_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    masks = boundary_class_masks(boundary_class, gpu.vocab_size)
    fp32_head, bf16_logits = [], []
    for ids, got in zip(sequences, gpu.score(sequences), strict=True):
        logp_fp32 = reference_scores(model_logits(fp32_model, ids).numpy(), ids, masks)[0]
        with torch.no_grad():
            logits = bf16_model(torch.as_tensor(ids[None, :], device="cuda")).logits[0]
        logp_bf16 = reference_scores(logits.float().cpu().numpy(), ids, masks)[0]
        fp32_head.append(np.abs(got.logp[1:] - logp_fp32[1:]))
        bf16_logits.append(np.abs(logp_bf16[1:] - logp_fp32[1:]))
    assert np.concatenate(fp32_head).mean() < np.concatenate(bf16_logits).mean()
