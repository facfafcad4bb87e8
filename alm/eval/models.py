"""Models that `alm eval` scores: one HF causal LM with its tokenizer, or an ensemble sharing a tokenizer.

Owns the shared context convention (docs/evaluation.md "The first token"): every text is scored after one
*context token* of the model's own, so the text's first token has a real conditional probability and every byte
of the text is scored. The context token is the template family's `bos` block when the family has one (Llama 3's
`<|begin_of_text|>`, Gemma's and plain models' `bos_token`), otherwise its end-of-document block (`<|endoftext|>`
for chatml models such as SmolLM2 and Qwen2, which have no BOS and see `<|endoftext|>` between pretraining
documents), otherwise the tokenizer's `eos_token`. A transferred student keeps the teacher's special tokens with
the teacher's embeddings (`student.transfer`), so it gets the same, trained, context token. A tokenizer with
none of these is refused.

Ensembles (ALM_SPEC §12 Table 2, the paper's second use of tokenizer transfer) average the members'
next-token probabilities (`combine: probs`, the paper's best) or their log-probabilities (`combine: logprobs`,
renormalised); they score and generate exactly like one model. An ensemble recipe is a small YAML:

    ensemble:
      members: [runs/a/student, runs/b/student]
      combine: probs

Imports `alm.teacher.default` (`builtin:` names), `alm.templates`, `alm.vocab`, `alm.config.load`, `alm.errors`;
torch and transformers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import yaml
from pydantic import Field

from alm.config.load import StrictModel, load_yaml_model
from alm.errors import ConfigError
from alm.teacher.default import resolve_teacher_path
from alm.templates import block_token_ids, family_for_tokenizer
from alm.vocab import Vocab, encode_text, vocab_from_tokenizer

logger = logging.getLogger(__name__)

Combine = Literal["probs", "logprobs"]
ENSEMBLE_SUFFIXES = (".yaml", ".yml")


class Scorer(Protocol):
    """What `alm eval` needs from a model: a tokenizer, its context token, and next-token logits."""

    name: str

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab(self) -> Vocab: ...

    @property
    def context_ids(self) -> np.ndarray: ...

    @property
    def max_positions(self) -> int | None: ...

    @property
    def device(self) -> torch.device: ...

    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """fp32 [B, T, len(vocab)]: logits (or unnormalised log-probs) of the token after each position."""
        ...


def context_token_ids(tokenizer: Any, vocab: Vocab) -> tuple[np.ndarray, str]:
    """The model's context token ids and which rule chose them (`bos`, `eos` or `eos_token`).

    Raises:
        ConfigError: the tokenizer has no BOS, end-of-document or EOS token.
    """
    family = family_for_tokenizer(vocab)
    for role in ("bos", "eos"):
        ids = block_token_ids(family, role, tokenizer, vocab)
        if len(ids):
            return np.asarray(ids, dtype=np.int64), role
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return np.asarray([eos], dtype=np.int64), "eos_token"
    raise ConfigError(
        f"tokenizer {vocab.name!r} has no bos, end-of-document or eos token, so alm eval cannot give its first "
        "text token a context (docs/evaluation.md 'The first token'); add one, e.g. "
        "tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}), and train the model with it"
    )


@dataclass
class ScoringModel:
    """One HF causal LM in eval mode with its tokenizer (see `load_model`, `scoring_model`)."""

    name: str
    model: Any
    tokenizer: Any
    vocab: Vocab
    context_ids: np.ndarray
    context_rule: str
    max_positions: int | None
    device: torch.device

    @torch.no_grad()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        logits = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        ).logits  # [B, T, V'] (V' may include padded rows)
        return logits[..., : len(self.vocab)].float()  # [B, T, V]


def scoring_model(
    model: Any, tokenizer: Any, name: str = "model", device: torch.device | None = None
) -> ScoringModel:
    """Wrap an in-memory HF causal LM and its tokenizer for `score_texts` / `evaluate_models`.

    Raises:
        ConfigError: the model's output has fewer columns than the tokenizer has tokens, or no context token.
    """
    vocab = vocab_from_tokenizer(tokenizer)
    num_columns = model.get_output_embeddings().weight.shape[0]
    if num_columns < len(vocab):
        raise ConfigError(
            f"model {name!r} predicts {num_columns} tokens but its tokenizer has {len(vocab)}; pair the model "
            "with the tokenizer it was trained with"
        )
    context_ids, rule = context_token_ids(tokenizer, vocab)
    model.eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    return ScoringModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        vocab=vocab,
        context_ids=context_ids,
        context_rule=rule,
        max_positions=int(max_positions) if max_positions else None,
        device=device or next(model.parameters()).device,
    )


def _is_alm_ngram_student(path: str) -> bool:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "alm_ngram_llama"
    except (OSError, ValueError):
        return False


def load_hf_model(name: str, device: str | torch.device = "cpu") -> ScoringModel:
    """Load a model folder, HF id or `builtin:` name (fp32) with its tokenizer.

    Raises:
        ConfigError: the model or tokenizer cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_teacher_path(name)
    # a byte student with n-gram embeddings ships its modelling code (alm's own `ngram_model.py`, docs/training.md)
    remote = _is_alm_ngram_student(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=remote
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r} cannot be loaded ({exc}). Give a model folder (e.g. runs/x/student), a cached HF id "
            "or builtin:smollm2-135m-instruct"
        ) from None
    target = torch.device(device)
    model.to(target)  # in place (nn.Module.to returns self)
    return scoring_model(model, tokenizer, name=name, device=target)


def is_ensemble_recipe(name: str) -> bool:
    return Path(name).suffix.lower() in ENSEMBLE_SUFFIXES


def load_model(name: str, device: str | torch.device = "cpu") -> ScoringModel | Ensemble:
    """`load_hf_model`, or `load_ensemble` for a `.yaml` ensemble recipe."""
    return load_ensemble(name, device) if is_ensemble_recipe(name) else load_hf_model(name, device)


# --------------------------------------------------------------------------------------------------------------
# Ensembles


class EnsembleSpec(StrictModel):
    """The `ensemble:` section of an ensemble recipe."""

    members: list[str] = Field(
        min_length=1,
        description="Model folders, HF ids or builtin: names that share one tokenizer.",
    )
    combine: Combine = Field(
        default="probs",
        description="Average the members' next-token probabilities (`probs`) or log-probabilities "
        "(`logprobs`, renormalised).",
    )
    name: str | None = Field(default=None, description="Name shown in tables (default: the file).")


class EnsembleRecipe(StrictModel):
    """An ensemble recipe file: `ensemble: {members: [...], combine: probs}`."""

    ensemble: EnsembleSpec


def combine_logits(member_logits: list[torch.Tensor], combine: Combine) -> torch.Tensor:
    """Ensemble next-token log-probs from the members' logits.

    Args:
        member_logits: M tensors fp32 [..., V] over the same vocabulary.
        combine: `probs`: log mean_m p_m; `logprobs`: log_softmax(mean_m log p_m).

    Returns:
        fp32 [..., V], normalised log-probabilities.
    """
    logp = torch.stack([torch.log_softmax(x.float(), dim=-1) for x in member_logits])  # [M, ..., V]
    if combine == "probs":
        return torch.logsumexp(logp, dim=0) - math.log(len(member_logits))
    return torch.log_softmax(logp.mean(dim=0), dim=-1)


@dataclass
class Ensemble:
    """Models that share a tokenizer, scored and sampled through their averaged next-token distribution."""

    name: str
    members: list[ScoringModel]
    combine: Combine = "probs"

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError(f"ensemble {self.name!r} has no members")
        first = self.members[0].vocab.fingerprint()
        others = [m.name for m in self.members[1:] if m.vocab.fingerprint() != first]
        if others:
            raise ConfigError(
                f"ensemble {self.name!r}: members {others} do not share the tokenizer of "
                f"{self.members[0].name!r}; move them to one tokenizer first (student.transfer) or score them "
                "separately"
            )

    @property
    def tokenizer(self) -> Any:
        return self.members[0].tokenizer

    @property
    def vocab(self) -> Vocab:
        return self.members[0].vocab

    @property
    def context_ids(self) -> np.ndarray:
        return self.members[0].context_ids

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def max_positions(self) -> int | None:
        limits = [m.max_positions for m in self.members if m.max_positions is not None]
        return min(limits) if limits else None

    @torch.no_grad()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        member_logits = [
            m.next_token_logits(input_ids, attention_mask).to(self.device) for m in self.members
        ]
        return combine_logits(member_logits, self.combine)  # [B, T, V]

    def save(self, path: str | Path) -> Path:
        """Write this ensemble as a recipe (members by the names they were loaded with)."""
        path = Path(path)
        recipe = {
            "ensemble": {
                "members": [m.name for m in self.members],
                "combine": self.combine,
                "name": self.name,
            }
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load an ensemble recipe; member paths are relative to the working directory, else to the recipe's folder.

    Raises:
        ConfigError: the recipe is invalid, a member cannot be loaded, or the members' tokenizers differ.
    """
    recipe = load_yaml_model(EnsembleRecipe, path)
    base = Path(path).resolve().parent

    def locate(member: str) -> str:
        if member.startswith("builtin:") or Path(member).exists():
            return member
        return str(base / member) if (base / member).exists() else member

    members = [load_hf_model(locate(m), device) for m in recipe.ensemble.members]
    return Ensemble(recipe.ensemble.name or Path(path).stem, members, recipe.ensemble.combine)


# --------------------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(
    scorer: Scorer,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> str:
    """Continue `prompt` (plain text, after the model's context token) with a model or an ensemble.

    Greedy when `temperature` is 0, else sampling from the (ensemble) distribution at that temperature. Each step
    runs the whole prefix (no KV cache: simple, and exact for ensembles of any members).

    Returns:
        the generated continuation (without the prompt), decoded by the tokenizer.
    """
    prompt_ids = encode_text(scorer.tokenizer, scorer.vocab, prompt.encode("utf-8")).token_id
    ids = torch.as_tensor(np.concatenate([scorer.context_ids, prompt_ids]), dtype=torch.long)[None]
    generator = torch.Generator().manual_seed(seed)
    eos_ids = {int(i) for i in scorer.vocab.special_role if scorer.vocab.special_role[i] == "eos"}
    eos_token = getattr(scorer.tokenizer, "eos_token_id", None)
    if eos_token is not None:
        eos_ids.add(int(eos_token))
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        logits = scorer.next_token_logits(ids, torch.ones_like(ids))[0, -1].cpu()  # [V]
        if temperature == 0:
            next_id = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if stop_at_eos and next_id in eos_ids:
            break
        new_ids.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return scorer.tokenizer.decode(new_ids, skip_special_tokens=False)
