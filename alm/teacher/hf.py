"""The Hugging Face transformers teacher backend (DESIGN.md "Stage one", HF backend; ALM_SPEC.md §10.2 option 1).

Batched teacher forcing on CPU (fp32 weights) or GPU (bf16 weights by default), under `torch.inference_mode`:

- sequences are **packed**, several per row (`packed_layout`: first-fit decreasing, rows as long as the longest
  sequence, grouped by a **token budget**: rows x row length <= budget). Each sequence's
  position ids restart at 0, which transformers turns into a block-diagonal causal mask (varlen kernels with flash
  attention), so no sequence sees another and padding is only the unfilled tail of a row. A probe at load time
  checks that the model honours packed position ids; a model that does not is scored one sequence per row,
  right-padded with an attention mask (`pack=False` forces that). The output order is always the input order;
- the model's decoder runs once per batch; the LM head is then applied to the valid positions only, in row chunks,
  in **fp32** (an fp32 copy of the head weight), so neither the padded [B, T, V] logits nor a full fp32 [tokens, V]
  tensor ever exists (`alm.teacher.scoring.scores_from_hidden`);
- the logit transforms that model families apply after the head are applied too, in fp32 (`logit_transform_of`:
  Gemma 2/3's `final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`); on GPU this is what
  keeps a soft-capped Gemma's scores from being computed from bf16 logits. A probe at load time checks, in the
  model's own dtype, that head + transform reproduce `model(x).logits` bit for bit; a model that does anything else
  (a scaled hidden state before the head, a vocabulary slice, a multiplier we do not know) is scored from the full
  `model(...).logits` instead, with a warning when those are not fp32;
- `hidden` is the decoder's `last_hidden_state`, the input of the LM head: the final-norm hidden state for
  Llama-style models (equal to `output_hidden_states[-1]`, checked in tests).

Scores are raw: temperature 1, no logits processors. Only this module and `default.py` import transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from alm.errors import BackendUnavailableError, ConfigError
from alm.teacher.base import (
    TeacherScores,
    boundary_class_masks,
    packed_layout,
    plan_padded_batches,
)
from alm.teacher.scoring import LogitTransform, class_mass_matrix, scores_from_hidden

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` means `cuda` when available, else `cpu`.

    Raises:
        BackendUnavailableError: a CUDA device was asked for on a machine without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"teacher.device is {device!r} but this machine has no CUDA device; use teacher.device=cpu or auto"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(model_path: str, revision: str | None = None):
    """Load the teacher's tokenizer from an HF id or a local folder.

    Raises:
        ConfigError: the tokenizer cannot be found or loaded.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"teacher.model {model_path!r}: cannot load its tokenizer ({exc}). Give a local model folder or a "
            "Hugging Face id (with network access or a filled HF cache)"
        ) from None


def model_config_hash(config_dict: dict) -> str:
    """Short sha256 of a model config dict (sorted JSON, transformers-version field dropped)."""
    clean = {
        k: v for k, v in config_dict.items() if k not in ("transformers_version", "_name_or_path")
    }
    blob = json.dumps(clean, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def local_revision(model_path: str) -> str:
    """A content fingerprint for a local model folder: sha256 over config.json and the weight files' names/sizes."""
    folder = Path(model_path)
    digest = hashlib.sha256()
    for item in sorted(folder.iterdir()):
        if item.name == "config.json":
            digest.update(item.read_bytes())
        elif item.suffix in (".safetensors", ".bin", ".gguf"):
            digest.update(f"{item.name}:{item.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:16]


def logit_transform_of(config: object) -> LogitTransform:
    """What a transformers causal LM with `config` does to `lm_head(hidden)` before returning logits.

    Known (transformers 5.x): `final_logit_softcapping` (Gemma 2, Gemma 3 when set, Gemma 3n/4, VaultGemma,
    nanochat), `logit_scale` (Cohere, Cohere 2), `logits_scaling` (Granite, Granite MoE). Anything else is caught by
    `HFTeacher`'s probe.
    """
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config

    def number(name: str) -> float | None:
        value = getattr(text_config, name, None)
        return (
            float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else None
        )

    return LogitTransform(
        multiply=number("logit_scale"),
        divide=number("logits_scaling"),
        softcap=number("final_logit_softcapping"),
    )


class ModelInfo(TypedDict):
    """What the store plan records about a model (`describe_model`)."""

    revision: str
    config_hash: str
    hidden_size: int
    vocab_size: int


def describe_model(model_path: str, revision: str | None = None) -> ModelInfo:
    """What the store plan records about a model, read from its config only (no weights are loaded).

    Returns:
        dict with `revision` (hub commit / given revision, or a local content fingerprint), `config_hash`,
        `hidden_size`, `vocab_size`.

    Raises:
        ConfigError: the model's config cannot be found.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"teacher.model {model_path!r}: cannot read its config ({exc}). Give a local model folder or a "
            "Hugging Face id (with network access or a filled HF cache)"
        ) from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if Path(model_path).is_dir():
        resolved = revision or local_revision(model_path)
    else:
        resolved = getattr(config, "_commit_hash", None) or revision or ""
    return {
        "revision": resolved,
        "config_hash": model_config_hash(config.to_dict()),
        "hidden_size": int(getattr(text_config, "hidden_size", 0) or 0),
        "vocab_size": int(getattr(text_config, "vocab_size", 0) or 0),
    }


class HFTeacher:
    """A transformers causal LM scoring token sequences (implements `TeacherBackend`).

    Args:
        model_path: HF id or local folder of a causal LM.
        boundary_class: int8 [V_tok] boundary class per tokenizer id (`Vocab.boundary_class`).
        model_id: what to record as the teacher's id (defaults to `model_path`).
        revision: hub revision (branch, tag or commit).
        dtype: `auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`, `float16`: the weights' dtype.
        device: `auto`, `cpu`, `cuda`, `cuda:1`, ...
        top_k: top-k entries per position (0: none).
        hidden_states: also return final-norm hidden states.
        token_budget: tokens per forward (rows x row length, padding included).
        row_chunk: positions per LM-head / fp32 log-softmax chunk.
        pack: pack several sequences per row (when the model honours packed position ids, see the module
            docstring); False scores one sequence per row.

    Raises:
        ConfigError: the model cannot be loaded.
    """

    name = "hf"
    boundary_method = "exact"

    def __init__(
        self,
        model_path: str,
        boundary_class: np.ndarray,
        *,
        model_id: str | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        top_k: int = 0,
        hidden_states: bool = False,
        token_budget: int = 4096,
        row_chunk: int = 1024,
        pack: bool = True,
    ) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.top_k = int(top_k)
        self.hidden_states = bool(hidden_states)
        self.token_budget = int(token_budget)
        self.row_chunk = int(row_chunk)
        self.model_id = model_id or model_path
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, revision=revision, dtype=self.dtype
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"teacher.model {model_path!r}: cannot load it as a causal LM ({exc}). Give a local model folder "
                "or a Hugging Face id"
            ) from None
        # transformers wraps `to` in functools.wraps(nn.Module.to), which hides the method binding from checkers
        self.model = model.to(self.device).eval()  # pyright: ignore[reportArgumentType]
        described = describe_model(model_path, revision)
        self.model_config_hash = str(described["config_hash"])
        self.model_revision = str(described["revision"])
        head = self.model.get_output_embeddings()
        self.vocab_size = (
            int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)
        )
        self.hidden_size = int(self.model.config.hidden_size)
        masks = torch.as_tensor(boundary_class_masks(boundary_class, self.vocab_size))
        self.mass_matrix = class_mass_matrix(masks).to(self.device)
        self.decoder = self.model.get_decoder()
        self.logit_transform = logit_transform_of(self.model.config)
        self.use_head_path = self._probe_head_path(head)
        if self.use_head_path:
            assert isinstance(head, torch.nn.Linear)  # checked by _probe_head_path
            # fp32 copy of the output layer: bf16 logits would lose ~0.1 nats on large logits
            self.head_weight = head.weight.detach().to(torch.float32)
            self.head_bias = None if head.bias is None else head.bias.detach().to(torch.float32)
        self._logits_buffer: torch.Tensor | None = None
        self.pack = bool(pack) and self._probe_packing()
        logger.info(
            "teacher %s on %s (%s), vocab %d, %s",
            self.model_id,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.vocab_size,
            f"LM head and logit transform ({self.logit_transform.describe()}) applied in fp32 row chunks"
            if self.use_head_path
            else "scored from full logits",
        )
        if not self.use_head_path and self.dtype != torch.float32:
            logger.warning(
                "teacher %s: its logits are not lm_head(hidden) followed by a known transform, so it is scored "
                "from %s logits (about 0.03 nats of rounding per token); use teacher.dtype=float32 for exact "
                "scores",
                self.model_id,
                str(self.dtype).removeprefix("torch."),
            )

    @torch.inference_mode()
    def _probe_head_path(self, head: torch.nn.Module | None) -> bool:
        """True when `model(x).logits == transform(head(decoder(x).last_hidden_state))` bit for bit, in the model's
        dtype (the same operations as the model's forward: then the fp32 path computes the same function)."""
        if not isinstance(head, torch.nn.Linear) or self.decoder is None:
            return False
        ids = torch.arange(1, 9, device=self.device)[None, :] % self.vocab_size
        try:
            full = self.model(input_ids=ids, use_cache=False).logits
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        except (TypeError, AttributeError):
            return False
        return bool(torch.equal(self.logit_transform.apply_(head(hidden)), full))

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, V] of hidden states [R, d] (head, bias, logit transform), written into one reused buffer.

        Reusing the [row_chunk, V] buffer (the scorer overwrites it in place) avoids allocating and
        page-faulting a fresh 100+ MB tensor per chunk, which on CPU costs about as much as the scoring.
        """
        rows = hidden.shape[0]
        if self._logits_buffer is None or self._logits_buffer.shape[0] < rows:
            self._logits_buffer = torch.empty(
                (rows, self.vocab_size), dtype=torch.float32, device=self.device
            )
        out = self._logits_buffer[:rows]
        torch.matmul(hidden.to(torch.float32), self.head_weight.T, out=out)  # [R, V]
        if self.head_bias is not None:
            out.add_(self.head_bias)
        return self.logit_transform.apply_(out)

    @torch.inference_mode()
    def _probe_packing(self) -> bool:
        """True when two sequences packed into one row score like each alone (packed position ids honoured)."""
        first = np.arange(3, 11, dtype=np.int64) % self.vocab_size
        second = np.arange(20, 25, dtype=np.int64) % self.vocab_size
        try:
            packed = self._forward_rows([[first, second]])[0][len(first) :]
            alone = self._forward_rows([[second]])[0]
        except (TypeError, ValueError, RuntimeError) as exc:
            logger.info("teacher does not take packed rows (%s); scoring one sequence per row", exc)
            return False
        scale = float(alone.abs().max()) + 1e-6
        if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3 * scale):
            logger.info("teacher ignores packed position ids; scoring one sequence per row")
            return False
        return True

    def _forward_rows(self, rows: list[list[np.ndarray]]) -> torch.Tensor:
        """Decoder output [R, W, d] (or logits [R, W, V] without the head path) of packed rows."""
        input_ids, position_ids, _ = self._packed_inputs(rows)
        model = self.decoder if self.use_head_path else self.model
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if self.use_head_path else out.logits

    def _packed_inputs(
        self, rows: list[list[np.ndarray]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids, position ids (restarting at 0 for each sequence and for the padded tail) and the valid mask,
        each [R, W] with W the longest row."""
        row_lengths = [sum(len(ids) for ids in row) for row in rows]
        width = max(row_lengths)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [R, W]
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [R, W]
        for r, row in enumerate(rows):
            offset = 0
            for ids in row:
                n = len(ids)
                input_ids[r, offset : offset + n] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
                position_ids[r, offset : offset + n] = torch.arange(n)
                offset += n
            # the padded tail is a block of its own: no real token attends to it
            position_ids[r, offset:] = torch.arange(width - offset)
        valid = torch.arange(width)[None, :] < torch.as_tensor(row_lengths)[:, None]  # [R, W]
        return input_ids.to(self.device), position_ids.to(self.device), valid.to(self.device)

    def score(self, batch_token_ids: list[np.ndarray]) -> list[TeacherScores]:
        """Score sequences (teacher forcing), packed and batched by the token budget; output order = input order."""
        results: list[TeacherScores | None] = [None] * len(batch_token_ids)
        lengths = [len(ids) for ids in batch_token_ids]
        if lengths and min(lengths) < 1:
            raise ValueError("cannot score an empty token sequence")
        if not self.pack:
            for batch in plan_padded_batches(lengths, self.token_budget):
                rows = [[i] for i in batch]
                for idx, scores in zip(batch, self._score_rows(batch_token_ids, rows), strict=True):
                    results[idx] = scores
            return results  # type: ignore[return-value]
        for rows in packed_layout(lengths, self.token_budget):
            order = [idx for row in rows for idx in row]
            for idx, scores in zip(order, self._score_rows(batch_token_ids, rows), strict=True):
                results[idx] = scores
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_rows(
        self, sequences: list[np.ndarray], rows: list[list[int]]
    ) -> list[TeacherScores]:
        """Score one forward pass: `rows` of indices into `sequences`; scores in row-major order."""
        packed = [[sequences[i] for i in row] for row in rows]
        lengths = [len(sequences[i]) for row in rows for i in row]
        if self.pack:
            input_ids, position_ids, valid = self._packed_inputs(packed)
            model_inputs = {"input_ids": input_ids, "position_ids": position_ids}
        else:  # one sequence per row, right-padded with an attention mask
            width = max(lengths)
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
            for r, (ids,) in enumerate(packed):
                input_ids[r, : len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
                attention_mask[r, : len(ids)] = 1
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            valid = attention_mask.bool()
            model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if int(input_ids.max()) >= self.vocab_size:
            raise ConfigError(
                f"token id {int(input_ids.max())} is outside the teacher model's {self.vocab_size} output rows: the "
                "tokenizer does not belong to this model"
            )
        flat_ids = input_ids[valid]  # [N], sequences laid end to end (row-major)
        if self.use_head_path:
            hidden = self.decoder(**model_inputs, use_cache=False).last_hidden_state  # [B, T, d]
            flat_hidden = hidden[valid]  # [N, d]
            del hidden
            return scores_from_hidden(
                flat_hidden,
                self._lm_head,
                flat_ids,
                lengths,
                self.mass_matrix,
                top_k=self.top_k,
                row_chunk=self.row_chunk,
                keep_hidden=self.hidden_states,
            )
        out = self.model(
            **model_inputs,
            use_cache=False,
            output_hidden_states=self.hidden_states,
        )
        flat_logits = out.logits[valid]  # [N, V]
        flat_hidden = out.hidden_states[-1][valid] if self.hidden_states else None  # [N, d]
        del out
        scores = scores_from_hidden(
            flat_logits,
            lambda rows: rows.to(torch.float32, copy=True),
            flat_ids,
            lengths,
            self.mass_matrix,
            top_k=self.top_k,
            row_chunk=self.row_chunk,
        )
        if flat_hidden is not None:
            hidden_np = flat_hidden.to(torch.float32).cpu().numpy()
            starts = np.cumsum([0, *lengths])
            scores = [
                TeacherScores(
                    s.logp, s.boundary_logmass, s.topk_id, s.topk_logp, hidden_np[a:b].copy()
                )
                for s, a, b in zip(scores, starts[:-1], starts[1:], strict=True)
            ]
        return scores
