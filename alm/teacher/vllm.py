"""The vLLM teacher backend: a thin adapter over `vllm.LLM` (DESIGN.md "Stage one", vLLM backend; ALM_SPEC.md §10.2).

    pip install 'alm[vllm]'            # on a CUDA machine: vLLM 0.33 (torch 2.14.0, transformers < 5.21)
    alm precompute stages/x.yaml --set teacher.backend=vllm --set teacher.vllm.tensor_parallel_size=2

Teacher forcing on the exact ids (`TokensPrompt(prompt_token_ids=ids)`), one greedy step (`max_tokens=1`,
`temperature=0`) whose `logprobs` give the distribution after the last token, raw log-probs
(`logprobs_mode="raw_logprobs"`: the log-softmax of the model's logits before any processor), `flat_logprobs`, no
detokenization, prefix caching off (a cache hit would drop prompt rows), bounded `max_num_batched_tokens`.
Every conversion of vLLM's outputs lives in `alm.teacher.vllm_convert` and is tested on CPU; this module only
builds the engine and the requests and is the only one that imports vLLM (lazily).

Boundary log-mass methods (`teacher.vllm.boundary_method`, recorded in the store's plan/manifest):

- `token_ids` (exact): `SamplingParams(prompt_logprob_token_ids=<every token of a boundary class>,
  prompt_logprob_start=0)` on vLLM's V2 model runner (`VLLM_USE_V2_MODEL_RUNNER=1`, set here if unset), with
  `max_logprobs` raised to the number of those ids. vLLM does not return the row after the final prompt token, so
  one dummy token is appended to every prompt; attention is causal, so it changes nothing before it.
- `hidden` (exact, experimental in vLLM): the `extract_hidden_states` speculative method with
  `ExampleHiddenStatesConnector` saves the last layer's states (before the output norm) per request; alm applies
  the teacher's final RMSNorm and LM head (read from the checkpoint's safetensors) in fp32. Llama-style
  checkpoints only (`model.norm.weight`, `lm_head.weight` or tied embeddings).
- `topk_lower` / `topk_upper` (approximate): the top-k bound from `prompt_logprobs=k` and `logprobs=k`
  (`teacher.vllm.num_logprobs`); see docs/vllm-fidelity.md for its measured error.

Nothing in this module has run on a real vLLM install in this project (none can be installed on the CPU machines
it was written on); the shapes it relies on were read from vLLM's source and docs, see `vllm_convert`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from alm.errors import BackendUnavailableError, ConfigError
from alm.teacher.base import TeacherScores, boundary_class_masks
from alm.teacher.vllm_convert import (
    boundary_token_ids,
    scores_from_prenorm_hidden,
    teacher_scores_from_request_output,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install 'alm[vllm]' on a CUDA machine (vLLM 0.33 needs torch 2.14.0 and transformers < 5.21; it has no "
    "CPU wheel), or use `teacher.backend: hf`"
)
BOUNDARY_METHODS = ("token_ids", "hidden", "topk_lower", "topk_upper")


def import_vllm() -> Any:
    """Import vLLM, or explain how to get it.

    Raises:
        BackendUnavailableError: vLLM is not installed, or this machine has no CUDA device.
    """
    try:
        import vllm
    except ImportError as exc:
        raise BackendUnavailableError(
            f"teacher.backend vllm: vLLM cannot be imported ({exc}); {INSTALL_HINT}"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"teacher.backend vllm: this machine has no CUDA device; {INSTALL_HINT}"
        )
    return vllm


class VLLMTeacher:
    """A vLLM engine scoring token sequences (implements `alm.teacher.base.TeacherBackend`).

    Args:
        model_path: HF id or local folder of the teacher.
        boundary_class: int8 [V_tok] boundary class per tokenizer id (`Vocab.boundary_class`).
        model_id: what to record as the teacher's id (defaults to `model_path`).
        revision: hub revision.
        dtype: `auto` (bf16), `float32`, `bfloat16`, `float16`: the weights' dtype in vLLM.
        top_k: top-k entries per position to store (0: none); needs `num_logprobs >= top_k`.
        hidden_states: store hidden states (not offered by this backend: use `hf`).
        max_model_len: longest prompt vLLM must accept (recipe max_length + 2: dummy and sampled tokens).
        tensor_parallel_size, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs, enforce_eager, seed:
            passed to `vllm.LLM`.
        num_logprobs: k of `prompt_logprobs`/`logprobs` (and of the top-k bound).
        boundary_method: `token_ids`, `hidden`, `topk_lower` or `topk_upper`.

    Raises:
        BackendUnavailableError: vLLM or CUDA is missing, or the method cannot run on this checkpoint.
        ConfigError: the settings contradict each other.
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        boundary_class: np.ndarray,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        top_k: int = 0,
        hidden_states: bool = False,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.8,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 64,
        num_logprobs: int = 20,
        boundary_method: str = "token_ids",
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        if boundary_method not in BOUNDARY_METHODS:
            raise ConfigError(
                f"teacher.vllm.boundary_method {boundary_method!r}; choose one of {BOUNDARY_METHODS}"
            )
        if top_k > num_logprobs:
            raise ConfigError(
                f"top_k={top_k} needs teacher.vllm.num_logprobs >= {top_k} (got {num_logprobs})"
            )
        if boundary_method.startswith("topk") and num_logprobs < 1:
            raise ConfigError(
                f"teacher.vllm.boundary_method {boundary_method} needs teacher.vllm.num_logprobs >= 1"
            )
        if hidden_states:
            raise ConfigError(
                "hidden_states: true is not offered by the vllm backend; precompute with teacher.backend: hf"
            )
        vllm = import_vllm()
        self.boundary_class = np.asarray(boundary_class)
        self.boundary_method = boundary_method
        self.num_logprobs = int(num_logprobs)
        self.top_k = int(top_k)
        self.model_id = model_id or model_path
        self.model_path = model_path
        self.version = f"vllm {vllm.__version__}"
        self.candidate_ids = (
            boundary_token_ids(self.boundary_class) if boundary_method == "token_ids" else None
        )
        engine_args: dict[str, Any] = {
            "model": model_path,
            "revision": revision,
            "dtype": "bfloat16" if dtype == "auto" else dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_num_batched_tokens": max_num_batched_tokens,
            "max_num_seqs": max_num_seqs,
            "max_model_len": max_model_len,
            # raw: log-softmax of the model's logits, before temperature, penalties or processors (§10.3)
            "logprobs_mode": "raw_logprobs",
            "max_logprobs": max(
                self.num_logprobs, 0 if self.candidate_ids is None else len(self.candidate_ids)
            ),
            # a prefix-cache hit skips prompt rows, which then have no logprobs
            "enable_prefix_caching": False,
            "enforce_eager": enforce_eager,
            "seed": seed,
        }
        self._hidden_dir: tempfile.TemporaryDirectory | None = None
        if boundary_method == "token_ids":
            # prompt_logprob_token_ids is served by the V2 model runner only (vLLM docs, prompt_token_id_logprobs)
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
        elif boundary_method == "hidden":
            self._hidden_dir = tempfile.TemporaryDirectory(prefix="alm-vllm-hidden-")
            engine_args.update(self._hidden_engine_args(model_path, self._hidden_dir.name))
        self.llm = vllm.LLM(**{k: v for k, v in engine_args.items() if v is not None})
        self._sampling = self._sampling_params(vllm)
        config = self.llm.llm_engine.model_config.hf_config
        config_dict = config.to_dict()
        from alm.teacher.hf import model_config_hash

        self.model_config_hash = model_config_hash(config_dict)
        self.model_revision = revision or ""
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)
        self._head = _LlamaHead(model_path, config_dict) if boundary_method == "hidden" else None
        logger.info(
            "vLLM teacher %s (tp=%d), boundary %s, k=%d",
            self.model_id,
            tensor_parallel_size,
            boundary_method,
            self.num_logprobs,
        )

    def _hidden_engine_args(self, model_path: str, folder: str) -> dict[str, Any]:
        config = _read_config(model_path)
        return {
            "enable_chunked_prefill": False,  # required by extract_hidden_states (vLLM example)
            "speculative_config": {
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {
                    # layer id num_hidden_layers = the last layer's output, before the norm (vLLM docs)
                    "hf_config": {
                        "eagle_aux_hidden_state_layer_ids": [int(config["num_hidden_layers"])]
                    }
                },
            },
            "kv_transfer_config": {
                "kv_connector": "ExampleHiddenStatesConnector",
                "kv_role": "kv_producer",
                "kv_connector_extra_config": {"shared_storage_path": folder},
            },
        }

    def _sampling_params(self, vllm: Any) -> Any:
        extra: dict[str, Any] = {}
        if self.candidate_ids is not None:
            extra["prompt_logprob_token_ids"] = self.candidate_ids.tolist()
            extra["prompt_logprob_start"] = 0
        # with `hidden`, everything is recomputed from the hidden states: no log-probs needed from vLLM
        num = None if self.boundary_method == "hidden" else self.num_logprobs
        return vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=num,
            logprobs=num,
            flat_logprobs=True,
            detokenize=False,
            **extra,
        )

    @property
    def _dummy_last_token(self) -> bool:
        return self.boundary_method in ("token_ids", "hidden")

    def score(self, batch_token_ids: list[np.ndarray]) -> list[TeacherScores]:
        """Score sequences with teacher forcing; output order = input order (vLLM schedules the batch itself)."""
        # vllm is optional (the vllm extra); __init__ has already imported it
        from vllm.inputs import TokensPrompt  # pyright: ignore[reportMissingImports]

        prompts = []
        for ids in batch_token_ids:
            ids_list = [int(t) for t in np.asarray(ids).tolist()]
            if self._dummy_last_token:
                ids_list.append(ids_list[-1])  # any id: only the rows before it are used
            prompts.append(TokensPrompt(prompt_token_ids=ids_list))
        outputs = self.llm.generate(prompts, self._sampling, use_tqdm=False)
        results = []
        for out in outputs:
            if self.boundary_method == "hidden":
                results.append(self._score_hidden(out))
                continue
            results.append(
                teacher_scores_from_request_output(
                    out,
                    self.boundary_class,
                    num_logprobs=self.num_logprobs,
                    boundary_method=self.boundary_method,  # type: ignore[arg-type]
                    store_top_k=self.top_k,
                    candidate_ids=self.candidate_ids,
                    dummy_last_token=self._dummy_last_token,
                )
            )
        return results

    def _score_hidden(self, out: Any) -> TeacherScores:
        from vllm.distributed.kv_transfer.kv_connector.v1 import (  # pyright: ignore[reportMissingImports]
            example_hidden_states_connector as conn,
        )

        path = (out.kv_transfer_params or {}).get("hidden_states_path")
        if path is None:
            raise BackendUnavailableError(
                "vLLM returned no hidden_states_path: this vLLM does not support extract_hidden_states with "
                "ExampleHiddenStatesConnector; use teacher.vllm.boundary_method: token_ids"
            )
        data = conn.load_hidden_states(path)
        conn.cleanup_hidden_states(path)
        n = len(out.prompt_token_ids) - 1  # drop the dummy
        hidden = data["hidden_states"][:n, -1]  # [n, d], last extracted layer, before the norm
        assert self._head is not None
        masks = boundary_class_masks(self.boundary_class, self.vocab_size)
        scores = scores_from_prenorm_hidden(
            hidden,
            self._head.norm,
            self._head.head,
            np.asarray(out.prompt_token_ids[:n]),
            masks,
            top_k=self.top_k,
        )
        return scores


def _read_config(model_path: str) -> dict[str, Any]:
    folder = Path(model_path)
    if folder.is_dir():
        return json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).to_dict()


class _LlamaHead:
    """The teacher's final RMSNorm and LM head in fp32 on the GPU, read from its safetensors (Llama-style names)."""

    NORM_KEYS = ("model.norm.weight",)
    HEAD_KEYS = ("lm_head.weight", "model.embed_tokens.weight")

    def __init__(self, model_path: str, config: dict[str, Any], device: str = "cuda") -> None:
        import torch
        from safetensors import safe_open

        if config.get("final_logit_softcapping") or config.get("logit_scale"):
            raise BackendUnavailableError(
                "boundary_method hidden supports plain RMSNorm + linear heads; this teacher scales its logits. "
                "Use teacher.vllm.boundary_method: token_ids"
            )
        folder = Path(model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json"]))
        tensors: dict[str, Any] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                names = set(f.keys())  # safe_open handles have no __contains__
                for key in (*self.NORM_KEYS, *self.HEAD_KEYS):
                    if key in names and key not in tensors:
                        tensors[key] = f.get_tensor(key)
        norm_w = next((tensors[k] for k in self.NORM_KEYS if k in tensors), None)
        head_w = next((tensors[k] for k in self.HEAD_KEYS if k in tensors), None)
        if norm_w is None or head_w is None:
            raise BackendUnavailableError(
                f"boundary_method hidden: {model_path} has no {self.NORM_KEYS[0]} / lm_head weights under "
                "Llama-style names; use teacher.vllm.boundary_method: token_ids"
            )
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.norm_weight = norm_w.to(device, torch.float32)
        self.head = torch.nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, device=device)
        self.head.weight.data = head_w.to(device, torch.float32)

    def norm(self, hidden: Any) -> Any:
        import torch

        x = hidden.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.norm_weight
