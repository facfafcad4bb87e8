"""The training recipe (`alm train RECIPE`): `TrainRecipe` and its parts.

Owns the schema of `stages/*train*.yaml` and `stages/paper_*.yaml` and every rule that can be checked without
opening a store or loading a model (field types, ranges, cross-field rules). Rules that need a store's manifest
(fingerprints, stored fields a loss needs) are checked by `alm.train.loader.check_stores` before any model loads.
Implements the knobs of ALM_SPEC §6-§8 and §11 (gamma, temperature, divergence, boundary classes, GradMag,
hidden-state loss, LoRA, AdamW with warmup and linear decay).

Imports only `alm.config.load`, `alm.boundary` (the class table and default set) and pydantic.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from alm.boundary import DEFAULT_BOUNDARY_CLASS_NAMES, BoundaryClass, boundary_class_ids
from alm.config.load import StrictModel

LrSchedule = Literal[
    "linear",
    "cosine",
    "cosine_with_min_lr",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "warmup_stable_decay",
]
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a boolean environment variable
Tracker = Literal["tensorboard", "wandb"]
# The package each tracker needs (checked at config time, so a missing one is one clear error, never skipped).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
Divergence = Literal["binary_ce", "reverse_binary_kl", "abs_exp", "abs", "binary_kl_temp_limit"]
LossKind = Literal["alm", "sft", "alm+sft", "topk_kd", "uld", "uld+sft", "mined+sft"]
BaselineLoss = Literal["topk_kd", "uld", "mined"]
BASELINE_LOSSES: tuple[BaselineLoss, ...] = ("topk_kd", "uld", "mined")


class StoreRef(StrictModel):
    """A teacher store to train from, with the fingerprints the recipe expects (checked before any model loads)."""

    path: str = Field(
        description="Teacher store folder (or fsspec URL) written by `alm precompute`."
    )
    teacher_tokenizer_fingerprint: str | None = Field(
        default=None,
        description="Expected teacher-tokenizer fingerprint (sha256 hex); a different store is refused.",
    )
    data_fingerprint: str | None = Field(
        default=None,
        description="Expected data-spec fingerprint; a store made from other data is refused.",
    )
    alignments: Literal["auto", "required", "off"] = Field(
        default="auto",
        description=(
            "The store's alignment cache for this student (`alm align`): `auto` uses a matching one and otherwise "
            "aligns on the fly (a log line says why); `required` refuses a missing or stale cache; `off` always "
            "aligns on the fly."
        ),
    )


class TransferConfig(StrictModel):
    """Tokenizer transfer: the teacher's own weights moved to a new tokenizer (ALM_SPEC §8, FVT init)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(
        default="teacher",
        alias="from",
        description="`teacher` (the model recorded in the store's manifest) or an HF id/path of the model to move.",
    )
    tokenizer: str = Field(
        default="bytes",
        description="`bytes` (a pure byte tokenizer keeping the teacher's special tokens) or a tokenizer id/path.",
    )
    untie_embeddings: bool = Field(
        default=False,
        description="Give the student separate input and output embeddings (ALM_SPEC §8, byte students).",
    )
    ngram_embeddings: bool = Field(
        default=False,
        description=(
            "Byte students only (`tokenizer: bytes`): add to each byte's input embedding the frozen teacher "
            "embedding of the longest teacher subword ending at that byte, looking back at most 16 bytes (paper "
            "App. C, ALM_SPEC §8). Llama-architecture teachers; the saved student loads with "
            "`trust_remote_code=True` (docs/training.md)."
        ),
    )
    embedding_projector: Literal["identity", "linear", "mlp"] = Field(
        default="identity",
        description=(
            "A residual projector on the new input embeddings, E' = E + P(E), trained with the student and "
            "zero-initialised on its residual branch (ALM_SPEC §8; tokenkit's `hypernet.architecture`): "
            "`identity` (none, as the paper's examples), `linear` (P(e) = A e + b) or `mlp` (P(e) = "
            "W2 gelu(W1 LayerNorm(e))). Needs `untie_embeddings: true`; the saved student has W + P(W) as its "
            "input table (docs/training.md)."
        ),
    )
    special_tokens: Literal["student", "teacher"] = Field(
        default="student",
        description=(
            "`student`: the student tokenizer keeps its own special tokens and template family. `teacher`: the "
            "teacher's special tokens are added to it (bos/eos/pad and chat template become the teacher's, their "
            "embeddings are copied) and it renders the teacher's family, as the paper's transfers do (ALM_SPEC "
            "§12 Table 12: losing them costs 55.1 -> 46.4). `tokenizer: bytes` always keeps the teacher's."
        ),
    )


class StudentConfig(StrictModel):
    """Which student to train: an HF causal LM, or the teacher moved to a new tokenizer."""

    model: str | None = Field(
        default=None,
        description="HF model id or local folder of the student (omit with `transfer`).",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer id/path; defaults to the model's own tokenizer."
    )
    transfer: TransferConfig | None = Field(
        default=None, description="Build the student by tokenizer transfer instead."
    )
    family: Literal["auto", "chatml", "llama3", "gemma", "plain", "role_prefix", "template"] = (
        Field(
            default="auto",
            description=(
                "Template family used to render the student's sequences; `auto`: chat with the tokenizer's own Jinja "
                "chat_template when it renders turns at fixed spans (prefix-stable, content verbatim), else the "
                "family its special tokens imply; `template` asks for the tokenizer's template; "
                "`role_prefix` renders it as plain text (`User: ...`, blank line between turns) for base models."
            ),
        )
    )
    max_length: int = Field(
        default=512, ge=2, description="Student sequence length in tokens (byte students: ~4x)."
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute each transformer block's activations in the backward pass instead of keeping them "
            "(transformers' `gradient_checkpointing_enable`, non-reentrant): less memory, ~30% more compute."
        ),
    )
    strip_unicode_normalizer: bool = Field(
        default=False,
        description=(
            "Drop an NFC/NFD/NFKC/NFKD normalizer from the student tokenizer (e.g. Qwen2's NFC), as tokenkit "
            "does (ALM_SPEC §2). Each encode still checks that the tokens reproduce the text's bytes."
        ),
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (
            self.transfer is not None
            and self.transfer.ngram_embeddings
            and self.transfer.tokenizer != "bytes"
        ):
            raise ValueError(
                "student.transfer.ngram_embeddings needs a byte student: set transfer.tokenizer: bytes"
            )
        if (
            self.transfer is not None
            and self.transfer.embedding_projector != "identity"
            and not self.transfer.untie_embeddings
        ):
            raise ValueError(
                f"student.transfer.embedding_projector: {self.transfer.embedding_projector} changes the input "
                "embeddings only, so they cannot stay tied to the output head: set "
                "student.transfer.untie_embeddings: true"
            )
        if (self.model is None) == (self.transfer is None):
            raise ValueError(
                "give exactly one of student.model (an HF id or path) or student.transfer "
                "(e.g. transfer: {from: teacher, tokenizer: bytes})"
            )
        if self.transfer is not None and self.tokenizer is not None:
            raise ValueError(
                "student.tokenizer is only for student.model; with transfer use transfer.tokenizer"
            )
        return self


class LossConfig(StrictModel):
    """Which losses to train with and their options (ALM_SPEC §6-§7)."""

    kind: LossKind = Field(
        default="alm",
        description=(
            "`alm` (default), `sft`, or `alm+sft` combined with GradMag; baselines from the store's top-k "
            "(`docs/baselines.md`): `topk_kd` (same tokenizer only), `uld`, `uld+sft`, `mined+sft`."
        ),
    )
    hidden: float = Field(
        default=0.0,
        ge=0.0,
        description="Weight of the hidden-state loss (0 = off); needs `hidden` in the store.",
    )
    gamma: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Teacher boundary-probability threshold for merging.",
    )
    temperature: float = Field(default=100.0, gt=0.0, description="Binarisation temperature tau.")
    divergence: Divergence = Field(
        default="binary_ce", description="Binarised divergence per chunk group."
    )
    boundary_classes: list[BoundaryClass] = Field(
        default_factory=lambda: list(DEFAULT_BOUNDARY_CLASS_NAMES),
        min_length=1,
        description="First-byte classes that count as a pretoken boundary (debiasing and merging).",
    )
    debias: bool = Field(
        default=True,
        description=(
            "Outcome-chunk debiasing (append_space, ALM_SPEC §5.2): multiply each group's probability on both "
            "sides by the next-token boundary mass. false is the paper's Table 8 ablation; merging still uses gamma."
        ),
    )
    combine: Literal["gradmag", "sum"] = Field(
        default="gradmag",
        description="How several losses are combined: GradMag (paper default) or a plain sum.",
    )
    baseline_weight: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description=(
            "`uld+sft` and `mined+sft` with `combine: sum`: (1 - w)·SFT + w·baseline (FuseLLM's MinED: "
            "0.9·CE + 0.1·KL, so w = 0.1). Ignored under GradMag and by the other kinds."
        ),
    )

    @field_validator("boundary_classes")
    @classmethod
    def _unique_classes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"boundary classes must not repeat, got {value}")
        return value

    def losses(self) -> list[str]:
        """The active loss names in a fixed order: `alm`, `topk_kd`, `uld`, `mined`, `sft`, `hidden`."""
        parts = self.kind.split("+")
        names = [n for n in ("alm", *BASELINE_LOSSES, "sft") if n in parts]
        return [*names, "hidden"] if self.hidden > 0 else names

    def baseline(self) -> BaselineLoss | None:
        """The baseline distillation loss of `kind`, or None (ALM and SFT need no stored top-k)."""
        return next((n for n in BASELINE_LOSSES if n in self.kind.split("+")), None)

    def boundary_class_ids(self) -> list[int]:
        """Store column indices of the chosen boundary classes, ascending."""
        return list(boundary_class_ids(self.boundary_classes))


class OptimConfig(StrictModel):
    """AdamW with linear warmup then linear decay to zero (ALM_SPEC §8, §11)."""

    lr: float = Field(default=1e-5, gt=0.0, description="Peak learning rate.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas.")
    eps: float = Field(default=1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay.")
    steps: int = Field(..., ge=1, description="Total optimizer steps.")
    warmup_steps: int = Field(
        default=0, ge=0, description="Linear warmup steps (then linear decay to 0 at `steps`)."
    )
    lr_scheduler_type: LrSchedule = Field(
        default="linear",
        description=(
            "Learning-rate schedule, by `transformers.get_scheduler` name: `linear` (warmup, then linear decay "
            "to 0), `cosine`, `cosine_with_min_lr`, `cosine_with_restarts`, `polynomial`, `constant`, "
            "`constant_with_warmup`, `inverse_sqrt`, `warmup_stable_decay`. Warmup reaches the peak on its last "
            "step (no step runs at lr 0)."
        ),
    )
    lr_scheduler_kwargs: dict[str, float | int] = Field(
        default_factory=dict,
        description=(
            "Extra arguments of the schedule (`transformers.get_scheduler`'s `scheduler_specific_kwargs`), e.g. "
            "`{min_lr_rate: 0.1}` for `cosine_with_min_lr`, `{num_cycles: 2}` for `cosine_with_restarts`."
        ),
    )
    grad_clip: float | None = Field(
        default=1.0, gt=0.0, description="Global gradient-norm clip; null disables it."
    )
    grad_accum: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step (per process)."
    )
    micro_batch_size: int = Field(
        default=8, ge=1, description="Sequences per micro-batch (per process)."
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {value}")
        return value


class LoraConfig(StrictModel):
    """LoRA adapters via peft (ALM_SPEC §8: q/k/v/o + MLP, r = alpha = 64, embeddings trained fully)."""

    r: int = Field(default=64, ge=1, description="LoRA rank.")
    alpha: float = Field(default=64.0, gt=0.0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        min_length=1,
        description="Module names that get adapters.",
    )
    train_embeddings: bool = Field(
        default=True, description="Train input/output embeddings fully (needed after transfer)."
    )


class EvalConfig(StrictModel):
    """Held-out evaluation: student bits per byte and chunk agreement with the teacher."""

    store: str = Field(
        ..., description="Held-out teacher store (same teacher tokenizer as the training stores)."
    )
    every: int = Field(
        default=0,
        ge=0,
        description="Evaluate every N optimizer steps (0: only before and after training).",
    )
    max_sequences: int | None = Field(
        default=None, ge=1, description="Evaluate on at most this many sequences."
    )


class TrainRecipe(StrictModel):
    """A whole `alm train` recipe; every problem is reported at once by `alm.config.load_yaml_model`."""

    example_file: ClassVar[str] = "stages/demo_train.yaml"  # named when a recipe file is missing

    stores: list[StoreRef] = Field(
        ..., min_length=1, description="Teacher stores to train from (one or more)."
    )
    student: StudentConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig
    lora: LoraConfig | None = Field(
        default=None, description="LoRA settings; omit for full fine-tuning."
    )
    eval: EvalConfig | None = Field(default=None, description="Held-out evaluation; omit to skip.")
    output_dir: str = Field(..., description="Run folder: checkpoints, metrics, the final student.")
    seed: int = Field(default=0, description="Seed for data order, init draws and dropout.")
    stop_after_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "End this invocation after this many optimizer steps, with a checkpoint, as if interrupted "
            "(e.g. a job's time limit); continue with --resume. null: train to optim.steps."
        ),
    )
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description=(
            "Also save a resumable checkpoint every N optimizer steps (0: by time only). A checkpoint is always "
            "saved at the end, when the run is interrupted (Ctrl-C, SIGTERM) and every `checkpoint_minutes`; "
            "N larger than optim.steps means the final checkpoint only."
        ),
    )
    checkpoint_minutes: float = Field(
        default=30.0,
        ge=0.0,
        description="Save a resumable checkpoint when this many minutes passed since the last one (0: off).",
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        description="How many recent checkpoints to keep (like `save_total_limit`).",
    )
    keep_checkpoint_every_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Also keep, beyond the newest `keep_checkpoints`, every checkpoint whose step is a multiple of this "
            "(a permanent trail for later evaluation). null: none."
        ),
    )
    keep_checkpoint_every_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "Also keep, beyond the newest `keep_checkpoints`, the first checkpoint saved at least this many "
            "minutes after the previous one kept this way (by the time `state.pt` was written). null: none."
        ),
    )
    log_every: int = Field(default=1, ge=1, description="Write metrics every N steps.")
    num_workers: int = Field(
        default=0, ge=0, description="DataLoader worker processes building student batches."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="`auto`: bf16 autocast on GPU, fp32 on CPU."
    )
    parallel: Literal["ddp", "fsdp2"] = Field(
        default="ddp", description="Data parallelism under torchrun."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch's intra-op CPU threads per process (`torch.set_num_threads`); null: torch's default (the "
            "number of cores). On a shared or small machine fewer threads can run faster."
        ),
    )
    save_dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "dtype of the saved student's weights: `auto` is the training dtype (bf16 when the run trains under "
            "bf16 autocast, i.e. on GPU with `precision: auto`, else fp32), or `fp32` / `bf16`. Checkpoints "
            "always keep the fp32 master weights."
        ),
    )
    report_to: list[Tracker] = Field(
        default_factory=list,
        description=(
            "Experiment trackers that get the logged scalars, as in transformers/TRL: `tensorboard` "
            "(`OUTPUT/tensorboard/`, pip install 'alm[tensorboard]'), `wandb` (pip install 'alm[wandb]'; "
            "`WANDB_PROJECT`, `WANDB_MODE=offline` and the other `WANDB_*` variables apply), or `none` (the "
            "default). A string names one tracker. A tracker whose package is missing is refused here."
        ),
    )
    push_to_hub: bool = Field(
        default=False,
        description=(
            "Upload the final student folder to the Hugging Face Hub repo `hub_model_id` (created if missing; "
            "the token comes from `HF_TOKEN` or `hf auth login`). Refused with HF_HUB_OFFLINE=1."
        ),
    )
    hub_model_id: str | None = Field(
        default=None,
        description="Hub repo of the student for `push_to_hub`, e.g. `me/smollm2-bytes`.",
    )
    hub_private_repo: bool = Field(
        default=False, description="Create the `hub_model_id` repo as private."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, value: Any) -> Any:
        if value is None or value == "none" or value == ["none"]:
            return []
        if value == "all":
            return list(TRACKER_PACKAGES)
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        missing = [t for t in value if importlib.util.find_spec(TRACKER_PACKAGES[t]) is None]
        if missing:
            extras = ",".join(missing)
            raise ValueError(
                f"report_to names {missing} but the package is not installed: pip install 'alm[{extras}]' "
                "(or drop it from report_to)"
            )
        return value

    @field_validator("stores", mode="before")
    @classmethod
    def _paths_as_refs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainRecipe:
        problems = []
        if self.optim.warmup_steps > self.optim.steps:
            problems.append(
                f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds optim.steps ({self.optim.steps})"
            )
        if self.loss.hidden > 0 and self.lora is not None:
            problems.append(
                "loss.hidden needs full fine-tuning: the hidden-state loss is not set up with LoRA"
            )
        if self.parallel == "fsdp2" and self.lora is not None:
            problems.append("parallel: fsdp2 with LoRA is not supported; use ddp")
        if self.push_to_hub and not self.hub_model_id:
            problems.append("push_to_hub needs hub_model_id (the Hub repo, e.g. me/my-student)")
        if self.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
            problems.append(
                "push_to_hub is set but HF_HUB_OFFLINE is on: unset HF_HUB_OFFLINE, or set push_to_hub: false "
                "and upload the student folder later"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
