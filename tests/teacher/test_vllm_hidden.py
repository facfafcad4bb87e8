"""`boundary_method: hidden`: alm's final norm and LM head against transformers, per allowed architecture.

vLLM's hidden-state extraction returns the last decoder layer's output before the final norm; alm applies the norm
and head itself (`alm.teacher.vllm._FinalNormHead`, read from the checkpoint's safetensors). These tests build a
tiny random model of every architecture in `HIDDEN_ARCHITECTURES` (tied and untied heads), capture the input of its
final norm during a real forward pass, and require alm's norm + head to give the model's own logits. Architectures
whose head differs (Gemma's `1 + w` norm, Granite's `logits_scaling`, MiniCPM's scaling) are shown to differ and
refused before any engine is built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alm.errors import BackendUnavailableError
from alm.teacher.vllm import HIDDEN_ARCHITECTURES, _FinalNormHead, check_hidden_architecture
from tests.tolerance import assert_fp32_close

VOCAB = 80
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def _tiny(architecture: str, tie: bool, **extra):
    import transformers

    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "GemmaForCausalLM": transformers.GemmaConfig,
        "Gemma3ForCausalLM": transformers.Gemma3TextConfig,
        "GraniteForCausalLM": transformers.GraniteConfig,
    }[architecture]
    config = config_class(
        **SMALL, tie_word_embeddings=tie, rms_norm_eps=1e-5, architectures=[architecture], **extra
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = getattr(transformers, architecture)(config).to(torch.float32).eval()
        # random (not all-ones) final norm weights, so a norm that ignores or shifts them is caught
        with torch.no_grad():
            model.model.norm.weight.normal_(0.5, 0.3)
    return model


def _logits_and_prenorm(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}

    def keep_input(_module, args, _output):
        captured["prenorm"] = args[0][0].detach().clone()  # [m, d]

    hook = model.model.norm.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # [m, V]
    finally:
        hook.remove()
    return logits, captured["prenorm"]


IDS = np.random.default_rng(0).integers(0, VOCAB, size=17).tolist()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("architecture", HIDDEN_ARCHITECTURES)
def test_final_norm_and_head_reproduce_the_models_logits(architecture, tie, tmp_path):
    model = _tiny(architecture, tie)
    model.save_pretrained(tmp_path)
    logits, prenorm = _logits_and_prenorm(model, IDS)
    head = _FinalNormHead(str(tmp_path), model.config.to_dict(), device="cpu")
    with torch.no_grad():
        ours = head.head(head.norm(prenorm))
    assert_fp32_close(ours.numpy(), logits.numpy())


@pytest.mark.parametrize(
    ("architecture", "extra"),
    [
        ("GemmaForCausalLM", {"head_dim": 8}),
        ("Gemma3ForCausalLM", {"head_dim": 8}),
        ("GraniteForCausalLM", {"logits_scaling": 4.0}),
    ],
)
def test_other_heads_differ_from_alms_and_are_refused(architecture, extra, tmp_path):
    model = _tiny(architecture, tie=False, **extra)
    logits, prenorm = _logits_and_prenorm(model, IDS)
    # what alm's plain RMSNorm + linear head would store for this model
    x = prenorm * torch.rsqrt(prenorm.pow(2).mean(-1, keepdim=True) + 1e-5)
    with torch.no_grad():
        plain = model.lm_head(x * model.model.norm.weight)
    assert float((plain - logits).abs().max()) > 1e-2
    with pytest.raises(BackendUnavailableError, match=rf"{architecture}.*token_ids"):
        check_hidden_architecture(model.config.to_dict(), "teacher-x")
    model.save_pretrained(tmp_path)
    with pytest.raises(BackendUnavailableError, match="boundary_method: token_ids"):
        _FinalNormHead(str(tmp_path), model.config.to_dict(), device="cpu")


@pytest.mark.parametrize(
    "config",
    [
        {"architectures": ["MiniCPMForCausalLM"], "scale_emb": 12, "dim_model_base": 256},
        {"architectures": ["CohereForCausalLM"], "logit_scale": 0.0625},
        {"architectures": ["LlamaForCausalLM"], "logits_scaling": 8.0},
        {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "awq"}},
        {"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]},
        {},
    ],
)
def test_scaled_quantized_or_unknown_heads_are_refused(config):
    with pytest.raises(BackendUnavailableError, match="token_ids"):
        check_hidden_architecture(config, "teacher-x")


def test_a_plain_llama_config_is_accepted():
    check_hidden_architecture(
        {"architectures": ["LlamaForCausalLM"], "logit_scale": None, "tie_word_embeddings": True},
        "teacher-x",
    )


def test_an_untied_checkpoint_without_lm_head_weights_is_refused(tmp_path):
    model = _tiny("LlamaForCausalLM", tie=True)
    model.save_pretrained(tmp_path)  # a tied model saves no lm_head.weight
    config = {**model.config.to_dict(), "tie_word_embeddings": False}
    with pytest.raises(BackendUnavailableError, match=r"lm_head\.weight"):
        _FinalNormHead(str(tmp_path), config, device="cpu")
