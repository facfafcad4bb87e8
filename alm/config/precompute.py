"""The precompute recipe (`alm precompute RECIPE`): `PrecomputeRecipe` and its parts.

Owns the schema of `stages/*precompute*.yaml` (DESIGN.md "Stage one"; ALM_SPEC.md §10.3 for what is stored) and the
rules that can be checked without reading data or loading a model. `load_precompute_recipe(path, overrides)` reads
the YAML, applies `--set key=value` overrides and reports every problem at once.

Imports only `alm.config.load` and `alm.errors` (and pydantic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alm.config.load import StrictModel, load_yaml_model, read_yaml


class VllmOptions(StrictModel):
    """Engine settings for `teacher.backend: vllm` (GPU machines; `pip install 'alm[vllm]'`)."""

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per model replica.")
    gpu_memory_utilization: float = Field(
        default=0.80,
        gt=0.0,
        le=0.95,
        description="Fraction of GPU memory vLLM may take; prompt log-probs are not counted in vLLM's sizing, so "
        "leave headroom.",
    )
    max_num_batched_tokens: int = Field(
        default=8192,
        ge=16,
        description="Tokens per engine step (bounds log-prob memory); with `token_ids` lowered automatically to "
        "fit `token_ids_memory_gib`.",
    )
    token_ids_memory_gib: float = Field(
        default=4.0,
        gt=0.0,
        description="GPU memory, outside vLLM's own sizing, for `token_ids` scoring: 13 bytes x K boundary-class "
        "ids per in-flight token (SmolLM2, K = 32,128: 418 KB); `max_num_batched_tokens` is lowered to fit. "
        "Keep it within the headroom `gpu_memory_utilization` leaves.",
    )
    batch_invariant: bool = Field(
        default=False,
        description="Set VLLM_BATCH_INVARIANT=1: vLLM's batch-invariant kernels, so a sequence's scores do not "
        "depend on what it was batched with (bit-reproducible reruns, slower).",
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences scheduled at once.")
    num_logprobs: int = Field(
        default=20,
        ge=0,
        description="k of vLLM's prompt/sample log-probs (`max_logprobs`); top-k fallback bounds use it.",
    )
    boundary_method: Literal["token_ids", "hidden", "topk_lower", "topk_upper"] = Field(
        default="token_ids",
        description="How `boundary_logmass` is obtained with vLLM: `token_ids` (fixed token-id scoring of every "
        "boundary-class token, V2 model runner; exact, 13 bytes x K per token of GPU memory), `hidden` (vLLM's "
        "experimental hidden-state extraction, final norm + LM head applied in alm; exact, Llama/Mistral/Qwen2/"
        "Qwen3 only; recommended for large vocabularies), or a top-k bound `topk_lower`/`topk_upper` from "
        "`num_logprobs` (approximate; error in docs/vllm-fidelity.md). Recorded in the store.",
    )
    enforce_eager: bool = Field(default=False, description="Disable CUDA graphs (debugging).")
    seed: int = Field(
        default=0, description="Engine seed (scoring is deterministic; recorded for completeness)."
    )


class TeacherConfig(StrictModel):
    """Which teacher scores the data, and how it runs."""

    model: str = Field(
        description="HF model id, local folder, or `builtin:smollm2-135m-instruct` (the embedded default teacher)."
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag, commit) of an HF id."
    )
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="`hf` (transformers, CPU or GPU) or `vllm` (GPU)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights' dtype: `auto` is bf16 on GPU, fp32 on CPU (backend vllm: the checkpoint's own "
        "16-bit dtype, bf16 for fp32 checkpoints). Log-softmax is always fp32.",
    )
    device: str = Field(
        default="auto", description="`auto` (cuda if available), `cpu`, `cuda`, `cuda:N`."
    )
    family: Literal["auto", "chatml", "llama3", "gemma", "plain", "role_prefix", "template"] = (
        Field(
            default="auto",
            description=(
                "Template family used to render documents for this teacher; `auto`: chat with the tokenizer's own Jinja "
                "chat_template when it renders turns at fixed spans (prefix-stable, content verbatim), else the "
                "family its special tokens imply; `template` asks for the tokenizer's template; "
                "`role_prefix` renders it as plain text (`User: ...`, blank line between turns) for base models."
            ),
        )
    )
    vllm: VllmOptions = Field(
        default_factory=VllmOptions, description="vLLM engine settings (backend vllm)."
    )


class DataConfig(StrictModel):
    """Which documents the teacher reads."""

    spec: str | dict[str, Any] = Field(
        description="Data spec: a path to `data_specs/*.yaml` (relative to the working directory, else to the "
        "recipe's folder or its parent) or the spec inline as a mapping."
    )
    split: str | None = Field(
        default=None, description="Split to read (e.g. `train`, `heldout`); default: the spec's."
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Read at most this many documents (after empty ones are skipped), taking the spec's sources in "
            "turn (one document of each), so every source appears."
        ),
    )
    spec_overrides: list[str] = Field(
        default_factory=list,
        description=(
            "`key=value` changes applied to the data-spec file when `spec` is a path (list indices work: "
            "`sources.0.path=x`); `--set data.spec.sources.0.path=x` lands here."
        ),
    )


class PrecomputeRecipe(StrictModel):
    """A precompute recipe: teacher, data, sequence length, batching, stored fields, output store."""

    teacher: TeacherConfig
    data: DataConfig
    output: str = Field(description="Teacher store folder or fsspec URL to write.")
    max_length: int = Field(
        default=1024,
        ge=2,
        description="Teacher tokens per sequence; longer documents are truncated.",
    )
    token_budget: int = Field(
        default=8192,
        ge=1,
        description="Padded tokens per forward pass (sequences x longest sequence in the batch).",
    )
    row_chunk: int = Field(
        default=1024,
        ge=1,
        description="Positions per fp32 [rows, vocab] log-softmax buffer (memory bound, not results).",
    )
    top_k: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Store the top-k next-token ids and log-probs (0 = off).",
    )
    hidden_states: bool = Field(
        default=False, description="Store final-norm hidden states (for the hidden-state loss)."
    )
    hidden_dtype: Literal["bfloat16", "float16"] = Field(
        default="bfloat16", description="16-bit encoding of stored hidden states."
    )
    precision: Literal["compact", "exact"] = Field(
        default="compact",
        description=(
            "Stored float precision: `compact` rounds logp to 8 and boundary_logmass to 7 mantissa bits (a "
            "fifth smaller; the ALM loss and its gradient move by < 1e-3 relative, docs/store.md), `exact` "
            "keeps float32 logp and float16 boundary_logmass as computed."
        ),
    )
    compression: Literal["small", "fast", "none"] = Field(
        default="small",
        description=(
            "Codec preset of the stored arrays and index: `small` (Blosc zstd arrays, Zstd-19 index; 11.4 bytes "
            "per teacher token all in on the demo store), `fast` (lz4hc for token_id and logp, float16 fields and "
            "index stored raw; 24.4 bytes per token, whole-shard reads 3-4x faster), `none` (uncompressed; 29.0). "
            "Every preset is plain zarr + pyarrow; docs/store.md has the measured figures."
        ),
    )
    shard_size: int = Field(
        default=1024,
        ge=1,
        description="Sequences per shard; shard j holds documents [j*shard_size, (j+1)*shard_size).",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch's intra-op CPU threads (`torch.set_num_threads`); null: torch's default (the number of cores)."
        ),
    )
    skip_untokenizable: bool = Field(
        default=False,
        description=(
            "Skip (and count in the log) documents the teacher tokenizer cannot encode byte-exactly, e.g. "
            "characters it has no token for; by default such a document stops the run before the model loads."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> PrecomputeRecipe:
        if self.teacher.backend == "vllm" and self.teacher.device == "cpu":
            raise ValueError(
                "teacher.backend vllm runs on GPUs only; use teacher.backend: hf for teacher.device: cpu"
            )
        if self.teacher.backend == "vllm" and self.hidden_states:
            raise ValueError(
                "hidden_states: true needs teacher.backend: hf (the vLLM backend does not store hidden states)"
            )
        if self.teacher.backend == "vllm" and self.top_k > self.teacher.vllm.num_logprobs:
            raise ValueError(
                f"top_k {self.top_k} exceeds teacher.vllm.num_logprobs {self.teacher.vllm.num_logprobs}; "
                "raise num_logprobs or lower top_k"
            )
        return self


def load_precompute_recipe(
    path: str | Path, overrides: list[str] | None = None
) -> PrecomputeRecipe:
    """Load and validate a precompute recipe.

    Args:
        path: YAML file, e.g. `stages/demo_precompute.yaml`.
        overrides: `key.sub=value` strings from `--set`.

    Raises:
        ConfigError: the file is missing or malformed, or any value is invalid (all problems at once).
    """
    return load_yaml_model(PrecomputeRecipe, path, spec_file_overrides(path, overrides or []))


def spec_file_overrides(path: str | Path, overrides: list[str]) -> list[str]:
    """Route `--set data.spec.KEY=VALUE` into `data.spec_overrides` when the recipe's `data.spec` is a file path
    (setting a key inside a path string would replace the path with a mapping)."""
    prefix = "data.spec."
    if not any(o.startswith(prefix) for o in overrides) or not Path(path).is_file():
        return overrides
    data = read_yaml(path).get("data")
    if not (isinstance(data, dict) and isinstance(data.get("spec"), str)):
        return overrides
    moved = [o.removeprefix(prefix) for o in overrides if o.startswith(prefix)]
    kept = [o for o in overrides if not o.startswith(prefix)]
    existing = data.get("spec_overrides") or []
    return [*kept, f"data.spec_overrides={json.dumps([*existing, *moved])}"]
