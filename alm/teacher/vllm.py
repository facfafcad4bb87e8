"""The vLLM teacher backend: a thin adapter over `vllm.LLM` (DESIGN.md "Stage one", vLLM backend; ALM_SPEC.md §10.2).

    pip install 'alm[vllm]'            # on a CUDA machine: vLLM 0.33 (torch 2.14.0, transformers < 5.21)
    alm precompute stages/demo_precompute_vllm.yaml
    alm precompute stages/x.yaml --set teacher.backend=vllm --set teacher.vllm.tensor_parallel_size=2

Teacher forcing on the exact ids (`TokensPrompt(prompt_token_ids=ids)`), one greedy step (`max_tokens=1`,
`temperature=0`), raw log-probs (`logprobs_mode="raw_logprobs"`: the fp32 log-softmax of the model's logits before
any processor), `flat_logprobs`, no detokenization, prefix caching off (a cache hit would drop prompt rows),
bounded `max_num_batched_tokens`. Every conversion of vLLM's outputs lives in `alm.teacher.vllm_convert` and is
tested on CPU; this module builds the engine arguments and the requests (pure functions `engine_arguments`,
`request_logprobs`, `sampling_arguments`, checked against vLLM 0.33.0's own validation in
`tests/teacher/test_vllm_wheel.py`) and is the only module that imports vLLM (lazily).

Boundary log-mass methods (`teacher.vllm.boundary_method`, recorded in the store's plan/manifest):

- `token_ids` (exact): one `SamplingParams` per prompt with `prompt_logprob_token_ids` = the int32
  `[len(prompt) - 1, K]` array of every boundary-class token id (the same K ids broadcast to every row) and
  `prompt_logprob_start=0`; vLLM 0.33.0 requires that 2-D shape and checks its row count against each prompt
  (`vllm/sampling_params.py:984-1036`, `vllm/v1/engine/input_processor.py:464-475`), so the list of params goes to
  `LLM.generate` with the prompts. Needs the V2 model runner (`VLLM_USE_V2_MODEL_RUNNER=1`, set here if unset)
  and `max_logprobs >= K`. vLLM does not return the row after the final prompt token, so one dummy token is
  appended to every prompt; attention is causal, so it changes nothing before it. Memory, outside vLLM's own
  sizing: 13·K bytes per in-flight prompt token on the GPU (int64 ids, a bool pad mask and fp32 scores,
  `vllm/v1/worker/gpu/sample/prompt_logprob.py:55-63, 100`), plus 4·K in (int32 ids) and 4·K out (fp32 scores) per
  token on the CPU. `max_num_batched_tokens` is lowered automatically so the GPU buffers fit
  `teacher.vllm.token_ids_memory_gib`, and each `generate` call gets at most 4 × `max_num_batched_tokens` tokens.
- `hidden` (exact, experimental in vLLM): the `extract_hidden_states` speculative method with
  `ExampleHiddenStatesConnector` saves the last layer's states (before the output norm) per request; alm applies
  the teacher's final RMSNorm and LM head (read from the checkpoint's safetensors) in fp32. Only architectures
  whose final norm and head alm reproduces exactly (`HIDDEN_ARCHITECTURES`, tested against transformers) are
  accepted; the cheapest exact method for large vocabularies (no [tokens, K] buffers).
- `topk_lower` / `topk_upper` (approximate): the top-k bound from `prompt_logprobs=k` and `logprobs=k`
  (`teacher.vllm.num_logprobs`); see docs/vllm-fidelity.md for its measured error.

Nothing in this module has run on a real vLLM engine in this project (no GPU with vLLM was available); the
request arguments it builds are checked against the vLLM 0.33.0 wheel's own validation code on CPU, see
docs/vllm-fidelity.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
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

# Bytes per (prompt row, candidate id) that fixed token-id scoring holds on the GPU for a request from its first
# prefill chunk to its last: int64 ids + bool pad mask (`add_request`, prompt_logprob.py:55-63) and fp32 scores
# (`torch.empty_like(..., dtype=torch.float32)`, prompt_logprob.py:100). Not counted by vLLM's memory profiling.
TOKEN_IDS_GPU_BYTES_PER_ID = 8 + 1 + 4
# ... and on the CPU: int32 ids in (sampling_params.py:1036) and fp32 scores out (v1/engine/logprobs.py:366).
TOKEN_IDS_CPU_BYTES_PER_ID = 4 + 4
# Tokens per `generate` call with `token_ids`, in units of max_num_batched_tokens: bounds the CPU copies of the
# [rows, K] arrays (in and out) while keeping the engine's queue several steps deep.
TOKEN_IDS_STEPS_PER_CALL = 4

# Architectures whose final norm and LM head `_FinalNormHead` reproduces exactly (RMSNorm `w * x / rms(x)`, a
# bias-free linear head, no logit scaling), each tested against transformers on a tiny random model
# (tests/teacher/test_vllm_hidden.py). Others are refused: Gemma's norm is `(1 + w) * x / rms(x)`, Gemma 2 soft-caps
# the logits, Granite divides them by `logits_scaling`, MiniCPM scales the hidden states before the head, Cohere
# multiplies by `logit_scale`.
HIDDEN_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# Config keys that change the head of an otherwise allowed architecture (refused if set).
_HEAD_SCALING_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "scale_emb",
    "dim_model_base",
    "quantization_config",
)


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


def read_model_config(model_path: str, revision: str | None = None) -> dict[str, Any]:
    """The teacher's `config.json` as a dict: from a local folder, else `AutoConfig` at `revision`.

    Raises:
        ConfigError: the config cannot be found.
    """
    folder = Path(model_path)
    if folder.is_dir() and (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, revision=revision).to_dict()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"teacher.model {model_path!r} (revision {revision}): cannot read its config ({exc}); give a local "
            "model folder or a Hugging Face id with network access or a filled HF cache"
        ) from None


def resolve_vllm_dtype(dtype: str, config: dict[str, Any]) -> str:
    """The weights' dtype vLLM is asked for: `auto` keeps a 16-bit checkpoint's own dtype (an fp16 checkpoint is not
    recast to bf16, whose 8-bit mantissa would round its logits more), and runs fp32 or unlabelled checkpoints in
    bf16, like the HF backend on a GPU; any other value is used as given.

    Args:
        dtype: `teacher.dtype` (`auto`, `float32`, `bfloat16`, `float16`).
        config: the checkpoint's config dict (`torch_dtype`, or `dtype` in transformers 5).
    """
    if dtype != "auto":
        return dtype
    text = config.get("text_config") or {}
    stored = (
        config.get("dtype")
        or config.get("torch_dtype")
        or text.get("dtype")
        or text.get("torch_dtype")
    )
    stored = str(stored or "").removeprefix("torch.")
    return stored if stored in ("float16", "bfloat16") else "bfloat16"


def token_ids_max_batched_tokens(
    num_candidate_ids: int, max_num_batched_tokens: int, max_model_len: int, memory_gib: float
) -> int:
    """`max_num_batched_tokens` lowered so that fixed token-id scoring's GPU buffers fit `memory_gib`.

    A request holds `TOKEN_IDS_GPU_BYTES_PER_ID` × K bytes per prompt row from its first prefill chunk to its last,
    so at most `max_num_batched_tokens + max_model_len` rows are held at once (the tokens of one step plus one
    request whose prefill continues into the next step).

    Args:
        num_candidate_ids: K, the number of boundary-class token ids scored per row.
        max_num_batched_tokens: the configured tokens per engine step.
        max_model_len: the longest prompt (recipe max_length + 2).
        memory_gib: GPU memory those buffers may take, GiB.

    Returns:
        min(configured, what fits), never below `max_model_len` (one whole prompt per step).

    Raises:
        ConfigError: not even one step of `max_model_len` tokens fits.
    """
    bytes_per_row = TOKEN_IDS_GPU_BYTES_PER_ID * num_candidate_ids
    rows = int(memory_gib * 2**30) // bytes_per_row
    fitting = rows - max_model_len
    if fitting < max_model_len:
        need_gib = 2 * max_model_len * bytes_per_row / 2**30
        raise ConfigError(
            f"teacher.vllm.token_ids_memory_gib {memory_gib} holds {rows} rows of {num_candidate_ids} token ids "
            f"({bytes_per_row} bytes each on the GPU), fewer than two prompts of max_length + 2 = {max_model_len}; "
            f"raise it to at least {need_gib:.2f}, lower max_length, or use teacher.vllm.boundary_method: hidden"
        )
    return min(max_num_batched_tokens, fitting)


def request_logprobs(
    boundary_method: str, num_logprobs: int, top_k: int
) -> tuple[int | None, int | None]:
    """(`prompt_logprobs`, `logprobs`) of each request.

    `token_ids` and `hidden` append a dummy token, so the distribution after the last real token is a prompt row
    and no sample log-probs are needed; `token_ids` asks only for the stored top-k (0 still returns each actual
    token's log-prob, `vllm/v1/worker/gpu/sample/prompt_logprob.py:193-198` and `logprob.py:124-133`, so no top-20 is computed to be
    dropped); `hidden` recomputes everything from the hidden states; the top-k bounds need k everywhere.
    """
    match boundary_method:
        case "hidden":
            return None, None
        case "token_ids":
            return top_k, None
        case _:
            return num_logprobs, num_logprobs


def sampling_arguments(
    prompt_len: int,
    *,
    prompt_logprobs: int | None,
    logprobs: int | None,
    candidate_ids: np.ndarray | None,
) -> dict[str, Any]:
    """Keyword arguments of the `vllm.SamplingParams` of one teacher-forcing request of `prompt_len` tokens.

    With `candidate_ids` (K ids), `prompt_logprob_token_ids` is the int32 [prompt_len - 1, K] array that vLLM
    0.33.0 requires (row i scores token i + 1), given as a read-only broadcast view (no memory here; vLLM makes it
    contiguous, `sampling_params.py:1036`); `skip_clone` because each params object serves one request only
    (`sampling_params.py:392-397`), which saves vLLM a deep copy of that array.
    """
    kwargs: dict[str, Any] = {
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": prompt_logprobs,
        "logprobs": logprobs,
        "flat_logprobs": True,
        "detokenize": False,
    }
    if candidate_ids is not None:
        row = np.asarray(candidate_ids, np.int32)
        kwargs["prompt_logprob_token_ids"] = np.broadcast_to(row, (prompt_len - 1, row.shape[0]))
        kwargs["prompt_logprob_start"] = 0
        kwargs["skip_clone"] = True
    return kwargs


def engine_arguments(
    model_path: str,
    *,
    revision: str | None,
    dtype: str,
    max_model_len: int | None,
    tensor_parallel_size: int,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_logprobs: int,
    enforce_eager: bool,
    seed: int,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` (each a field of vLLM 0.33.0's `EngineArgs`), `None` values dropped."""
    engine_args: dict[str, Any] = {
        "model": model_path,
        "revision": revision,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        # raw: log-softmax of the model's logits, before temperature, penalties or processors (§10.3)
        "logprobs_mode": "raw_logprobs",
        "max_logprobs": max_logprobs,
        # a prefix-cache hit skips prompt rows, which then have no logprobs
        "enable_prefix_caching": False,
        "enforce_eager": enforce_eager,
        "seed": seed,
    }
    return {k: v for k, v in engine_args.items() if v is not None}


def check_hidden_architecture(config: dict[str, Any], model_path: str) -> None:
    """Refuse `hidden` for a teacher whose final norm or LM head alm does not reproduce exactly.

    Raises:
        BackendUnavailableError: the architecture is not in `HIDDEN_ARCHITECTURES`, or its config scales the
            logits or quantizes the head.
    """
    architectures = list(config.get("architectures") or [])
    fix = "use teacher.vllm.boundary_method: token_ids (exact for any architecture)"
    if len(architectures) != 1 or architectures[0] not in HIDDEN_ARCHITECTURES:
        raise BackendUnavailableError(
            f"teacher.vllm.boundary_method hidden: {model_path} is {architectures or 'of no architecture'}; alm "
            f"applies the final norm and LM head itself and reproduces them exactly only for "
            f"{', '.join(HIDDEN_ARCHITECTURES)} (Gemma's norm is (1 + w) * x / rms(x), Gemma 2 soft-caps, Granite "
            f"and MiniCPM scale their logits); {fix}"
        )
    scaled = [key for key in _HEAD_SCALING_KEYS if config.get(key) not in (None, False, 0, 1, 1.0)]
    if scaled:
        raise BackendUnavailableError(
            f"teacher.vllm.boundary_method hidden: {model_path} sets {', '.join(scaled)}, which changes its LM head "
            f"(alm applies a plain RMSNorm and linear head); {fix}"
        )


class VLLMTeacher:
    """A vLLM engine scoring token sequences (implements `alm.teacher.base.TeacherBackend`).

    Args:
        model_path: HF id or local folder of the teacher.
        boundary_class: int8 [V_tok] boundary class per tokenizer id (`Vocab.boundary_class`).
        model_id: what to record as the teacher's id (defaults to `model_path`).
        revision: hub revision (passed to vLLM, `AutoConfig` and `snapshot_download`).
        dtype: `auto` (the checkpoint's 16-bit dtype, bf16 for fp32 checkpoints; `resolve_vllm_dtype`),
            `float32`, `bfloat16`, `float16`: the weights' dtype in vLLM.
        top_k: top-k entries per position to store (0: none); needs `num_logprobs >= top_k`.
        hidden_states: store hidden states (not offered by this backend: use `hf`).
        max_model_len: longest prompt vLLM must accept (recipe max_length + 2: dummy and sampled tokens).
        tensor_parallel_size, gpu_memory_utilization, max_num_seqs, enforce_eager, seed: passed to `vllm.LLM`.
        max_num_batched_tokens: tokens per engine step; with `token_ids` lowered to fit `token_ids_memory_gib`.
        num_logprobs: k of `prompt_logprobs`/`logprobs` for the top-k bounds (and `max_logprobs`).
        boundary_method: `token_ids`, `hidden`, `topk_lower` or `topk_upper`.
        token_ids_memory_gib: GPU memory, outside vLLM's own sizing, for `token_ids`' [rows, K] buffers.
        batch_invariant: set `VLLM_BATCH_INVARIANT=1` (vLLM's batch-invariant kernels: scores independent of
            how requests are batched, at some speed cost).

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
        token_ids_memory_gib: float = 4.0,
        batch_invariant: bool = False,
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
        if (
            boundary_method == "hidden"
            and max_model_len is not None
            and max_num_batched_tokens < max_model_len
        ):
            # extract_hidden_states needs chunked prefill off, and then vLLM schedules a prompt in one step
            raise ConfigError(
                f"teacher.vllm.boundary_method hidden turns chunked prefill off, so every prompt (max_length + 2 = "
                f"{max_model_len} tokens) must fit one step: raise teacher.vllm.max_num_batched_tokens "
                f"({max_num_batched_tokens}) to at least {max_model_len} or lower max_length"
            )
        vllm = import_vllm()
        self._vllm = vllm
        self.version = f"vllm {vllm.__version__}"
        self.boundary_class = np.asarray(boundary_class)
        self.boundary_method = boundary_method
        self.num_logprobs = int(num_logprobs)
        self.top_k = int(top_k)
        self.model_id = model_id or model_path
        self.model_path = model_path
        self.candidate_ids = (
            boundary_token_ids(self.boundary_class) if boundary_method == "token_ids" else None
        )
        self.prompt_logprobs, self.sample_logprobs = request_logprobs(
            boundary_method, self.num_logprobs, self.top_k
        )
        config = read_model_config(model_path, revision)
        if boundary_method == "hidden":
            check_hidden_architecture(config, model_path)
        if self.candidate_ids is not None and max_model_len is not None:
            bounded = token_ids_max_batched_tokens(
                len(self.candidate_ids), max_num_batched_tokens, max_model_len, token_ids_memory_gib
            )
            if bounded < max_num_batched_tokens:
                logger.warning(
                    "token_ids: max_num_batched_tokens %d -> %d so that %d ids x 13 bytes per token fit "
                    "teacher.vllm.token_ids_memory_gib %.1f; for a large vocabulary boundary_method hidden needs "
                    "no such buffers (Llama, Mistral, Qwen2, Qwen3 teachers)",
                    max_num_batched_tokens,
                    bounded,
                    len(self.candidate_ids),
                    token_ids_memory_gib,
                )
            max_num_batched_tokens = bounded
        self.max_num_batched_tokens = max_num_batched_tokens
        self.dtype = resolve_vllm_dtype(dtype, config)
        engine_args = engine_arguments(
            model_path,
            revision=revision,
            dtype=self.dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_logprobs=max(
                self.num_logprobs, 0 if self.candidate_ids is None else len(self.candidate_ids)
            ),
            enforce_eager=enforce_eager,
            seed=seed,
        )
        if batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        self._hidden_dir: tempfile.TemporaryDirectory | None = None
        if boundary_method == "token_ids":
            # prompt_logprob_token_ids is served by the V2 model runner only (input_processor.py:163-169)
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
        elif boundary_method == "hidden":
            self._hidden_dir = tempfile.TemporaryDirectory(prefix="alm-vllm-hidden-")
            engine_args.update(hidden_engine_arguments(config, self._hidden_dir.name))
        self.llm = vllm.LLM(**engine_args)
        hf_config = self.llm.llm_engine.model_config.hf_config
        config_dict = hf_config.to_dict()
        from alm.teacher.hf import model_config_hash

        self.model_config_hash = model_config_hash(config_dict)
        self.model_revision = revision or ""
        self.vocab_size = int(hf_config.vocab_size)
        self.hidden_size = int(hf_config.hidden_size)
        self._head = (
            _FinalNormHead(model_path, config_dict, revision=revision)
            if boundary_method == "hidden"
            else None
        )
        logger.info(
            "vLLM teacher %s (tp=%d, %s), boundary %s, k=%d, max_num_batched_tokens %d",
            self.model_id,
            tensor_parallel_size,
            self.dtype,
            boundary_method,
            self.num_logprobs,
            max_num_batched_tokens,
        )

    @property
    def _dummy_last_token(self) -> bool:
        return self.boundary_method in ("token_ids", "hidden")

    def _generate_groups(self, prompt_lengths: Sequence[int]) -> list[range]:
        """Consecutive prompt ranges per `generate` call: with `token_ids`, at most TOKEN_IDS_STEPS_PER_CALL engine
        steps of tokens each (bounds the [rows, K] arrays held on the CPU), otherwise the whole batch."""
        if self.candidate_ids is None:
            return [range(len(prompt_lengths))]
        limit = TOKEN_IDS_STEPS_PER_CALL * self.max_num_batched_tokens
        groups, start, total = [], 0, 0
        for i, length in enumerate(prompt_lengths):
            if total and total + length > limit:
                groups.append(range(start, i))
                start, total = i, 0
            total += length
        groups.append(range(start, len(prompt_lengths)))
        return groups

    def score(self, batch_token_ids: list[np.ndarray]) -> list[TeacherScores]:
        """Score sequences with teacher forcing; output order = input order (vLLM schedules the batch itself)."""
        # vllm is optional (the vllm extra); __init__ has already imported it
        from vllm.inputs import TokensPrompt  # pyright: ignore[reportMissingImports]

        prompt_ids = []
        for ids in batch_token_ids:
            ids_list = [int(t) for t in np.asarray(ids).tolist()]
            if self._dummy_last_token:
                ids_list.append(ids_list[-1])  # any id: only the rows before it are used
            prompt_ids.append(ids_list)
        results: list[TeacherScores] = []
        for group in self._generate_groups([len(ids) for ids in prompt_ids]):
            prompts = [TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in group]
            # one SamplingParams per prompt: `token_ids` scores a [len(prompt) - 1, K] array of its own
            params = [
                self._vllm.SamplingParams(
                    **sampling_arguments(
                        len(prompt_ids[i]),
                        prompt_logprobs=self.prompt_logprobs,
                        logprobs=self.sample_logprobs,
                        candidate_ids=self.candidate_ids,
                    )
                )
                for i in group
            ]
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            del params
            for out in outputs:
                results.append(self._scores_of(out))
        return results

    def _scores_of(self, out: Any) -> TeacherScores:
        if self.boundary_method == "hidden":
            return self._score_hidden(out)
        return teacher_scores_from_request_output(
            out,
            self.boundary_class,
            num_logprobs=int(self.prompt_logprobs or 0),
            boundary_method=self.boundary_method,  # type: ignore[arg-type]
            store_top_k=self.top_k,
            candidate_ids=self.candidate_ids,
            dummy_last_token=self._dummy_last_token,
        )

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


def hidden_engine_arguments(config: dict[str, Any], folder: str) -> dict[str, Any]:
    """The extra `vllm.LLM` arguments of `hidden`: vLLM's `extract_hidden_states` speculative method and
    `ExampleHiddenStatesConnector` writing each request's states under `folder`."""
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


class _FinalNormHead:
    """The teacher's final RMSNorm and LM head in fp32, read from its safetensors (names shared by
    `HIDDEN_ARCHITECTURES`: `model.norm.weight`, `lm_head.weight`, or `model.embed_tokens.weight` when tied)."""

    NORM_KEY = "model.norm.weight"

    def __init__(
        self,
        model_path: str,
        config: dict[str, Any],
        device: str = "cuda",
        revision: str | None = None,
    ) -> None:
        import torch
        from safetensors import safe_open

        check_hidden_architecture(config, model_path)
        head_key = (
            "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
        )
        folder = Path(model_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    model_path, revision=revision, allow_patterns=["*.safetensors", "*.json"]
                )
            )
        tensors: dict[str, Any] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                names = set(f.keys())  # safe_open handles have no __contains__
                for key in (self.NORM_KEY, head_key):
                    if key in names and key not in tensors:
                        tensors[key] = f.get_tensor(key)
        missing = [key for key in (self.NORM_KEY, head_key) if key not in tensors]
        if missing:
            raise BackendUnavailableError(
                f"teacher.vllm.boundary_method hidden: {model_path} has no {', '.join(missing)} in its safetensors "
                f"(tie_word_embeddings={bool(config.get('tie_word_embeddings'))}); use "
                "teacher.vllm.boundary_method: token_ids"
            )
        head_w = tensors[head_key]
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.norm_weight = tensors[self.NORM_KEY].to(device, torch.float32)
        self.head = torch.nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, device=device)
        self.head.weight.data = head_w.to(device, torch.float32)

    def norm(self, hidden: Any) -> Any:
        import torch

        x = hidden.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.norm_weight
