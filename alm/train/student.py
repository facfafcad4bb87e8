"""The student model: load an HF causal LM, or move the teacher to a new tokenizer; optional LoRA.

Owns tokenizer transfer (ALM_SPEC §8, "FVT" initialisation): the teacher's weights keep everything but the
embeddings; each new token's input (and output) embedding is

1. the teacher embedding of the token with the same bytes, if the teacher vocabulary has one;
2. for special tokens, the teacher special token with the same string (`<|endoftext|>` is SmolLM2's unk but
   GPT-2's bos: the string decides), else the one with the same role (`bos`, `eos`, `pad`, `unk`);
3. otherwise the mean of the teacher embeddings of the token's decomposition under the teacher tokenizer;
4. otherwise (no decomposition) a normal draw with the old embeddings' per-dimension mean and std.

`transfer.special_tokens: teacher` first adds the teacher's special tokens to the student tokenizer
(`with_teacher_special_tokens`: bos/eos/pad and the chat template become the teacher's), so every one of them is
copied by rule 2 and the student renders the teacher's template family: the paper keeps the original special tokens
because losing them (BOS above all) costs 55.1 -> 46.4 (ALM_SPEC §12, Table 12).

Input and output embeddings can be untied (byte students, ALM_SPEC §8). LoRA comes from `peft`, imported lazily.
Never imports `torch.distributed` (see `alm.train.parallel`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from alm.config.train import LoraConfig, StudentConfig
from alm.errors import BackendUnavailableError, ConfigError, DataError, TokenizerRefusedError
from alm.teacher.default import refuse_missing_folder
from alm.templates import (
    FAMILY_END_OF_TURN,
    family_chat_template,
    is_template_family,
    resolve_family,
    template_end_of_turn,
)
from alm.vocab import (
    Vocab,
    build_byte_tokenizer,
    encode_text,
    vocab_from_tokenizer,
    without_unicode_normalizer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

NGRAM_MAX_BYTES = 16  # ALM_SPEC §8: look back at most 16 bytes


@dataclass
class Student:
    """A student ready to train: the model, its tokenizer, the tokenizer as bytes, where it came from, and the
    template family it renders sequences in (`alm.templates`)."""

    model: PreTrainedModel
    tokenizer: Any
    vocab: Vocab
    source: str
    family: str


@dataclass(frozen=True)
class TransferReport:
    """How each new token's embedding was initialised (counts by rule)."""

    num_copied: int
    num_special_by_string: int
    num_special_by_role: int
    num_averaged: int
    num_random: int

    @property
    def num_special(self) -> int:
        """Special tokens copied from a teacher special (by string or by role)."""
        return self.num_special_by_string + self.num_special_by_role


def load_tokenizer(name: str) -> Any:
    """Load an HF tokenizer (fast) from an id or a local folder.

    Raises:
        ConfigError: the tokenizer cannot be found.
    """
    from transformers import AutoTokenizer

    refuse_missing_folder(name, "student tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"student tokenizer {name!r} cannot be loaded ({exc}). Give a local folder or a cached hub id "
            "(set HF_HUB_OFFLINE=0 to download)."
        ) from None


def load_causal_lm(name: str) -> PreTrainedModel:
    """Load an HF causal LM in fp32 from an id or a local folder.

    Raises:
        ConfigError: the model cannot be found.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would sit above the run's own
    refuse_missing_folder(name, "student model")
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"student model {name!r} cannot be loaded ({exc}). Give a local folder or a cached hub id "
            "(set HF_HUB_OFFLINE=0 to download)."
        ) from None


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every special token string of `tokenizer`: the named ones (bos, eos, unk, pad, ...), then the added special
    tokens in id order."""
    specials = list(dict.fromkeys(str(t) for t in tokenizer.all_special_tokens))
    for _, added in sorted(tokenizer.added_tokens_decoder.items()):
        if getattr(added, "special", False) and added.content not in specials:
            specials.append(added.content)
    return specials


def with_teacher_special_tokens(student_tokenizer: Any, teacher_tokenizer: Any) -> Any:
    """A copy of `student_tokenizer` that also has every teacher special token, with the teacher's roles.

    Teacher specials the student lacks are appended as new special ids (regular text tokenizes exactly as
    before); bos, eos, unk and pad become the teacher's where the teacher has them; the chat template becomes the
    teacher's. Tokenizer transfer then copies all of them by string, as the paper's `target=<teacher family>`
    tokenizers do (ALM_SPEC §11.2, Table 12).
    """
    import copy

    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(student_tokenizer)
    have = set(special_token_strings(tokenizer))
    new = [s for s in special_token_strings(teacher_tokenizer) if s not in have]
    if new:
        tokenizer.add_tokens(
            [AddedToken(s, special=True, normalized=False) for s in new], special_tokens=True
        )
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(teacher_tokenizer, role, None)
        if value:
            setattr(tokenizer, role, str(value))
    template = getattr(teacher_tokenizer, "chat_template", None)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def byte_tokenizer_like(teacher_tokenizer: Any) -> Any:
    """The pure byte tokenizer with the teacher's special tokens (same strings, same bos/eos/pad roles)."""
    specials = special_token_strings(teacher_tokenizer)
    tok = build_byte_tokenizer(
        specials,
        bos=teacher_tokenizer.bos_token,
        eos=teacher_tokenizer.eos_token,
        pad=teacher_tokenizer.pad_token,
    )
    if getattr(teacher_tokenizer, "chat_template", None):
        tok.chat_template = teacher_tokenizer.chat_template
    return tok


def transfer_embeddings(
    old_embeddings: torch.Tensor,
    teacher_tokenizer: Any,
    teacher_vocab: Vocab,
    student_vocab: Vocab,
    generator: torch.Generator,
) -> tuple[torch.Tensor, TransferReport]:
    """New embedding rows for `student_vocab` initialised from the teacher's (ALM_SPEC §8).

    Args:
        old_embeddings: float [V_teacher, d] teacher input or output embeddings.
        teacher_tokenizer: the teacher's HF tokenizer (used to decompose new tokens).
        teacher_vocab: the teacher tokenizer as bytes.
        student_vocab: the new tokenizer as bytes.
        generator: seeded generator for the normal draws of unmatched tokens.

    Returns:
        float [V_student, d] new embeddings, and the count of tokens per rule.
    """
    old = old_embeddings.detach().float()
    num_old = min(old.shape[0], len(teacher_vocab.token_bytes))
    mean, std = old[:num_old].mean(dim=0), old[:num_old].std(dim=0)
    new = torch.empty(len(student_vocab.token_bytes), old.shape[1])
    teacher_id_by_bytes: dict[bytes, int] = {}
    for tid, tb in enumerate(teacher_vocab.token_bytes[:num_old]):
        if tb and not teacher_vocab.is_special[tid]:
            teacher_id_by_bytes.setdefault(tb, tid)
    teacher_id_by_text: dict[str, int] = {}
    teacher_id_by_role: dict[str, int] = {}
    for tid in sorted(teacher_vocab.special_role):
        if tid < num_old:
            teacher_id_by_text.setdefault(teacher_vocab.special_text.get(tid, ""), tid)
            teacher_id_by_role.setdefault(teacher_vocab.special_role[tid], tid)
    teacher_id_by_text.pop("", None)
    counts = {"copied": 0, "by_string": 0, "by_role": 0, "averaged": 0, "random": 0}
    for sid, sb in enumerate(student_vocab.token_bytes):
        if student_vocab.is_special[sid]:
            tid = teacher_id_by_text.get(student_vocab.special_text.get(sid, ""))
            rule = "by_string"
            if tid is None:
                tid = teacher_id_by_role.get(student_vocab.special_role.get(sid, ""))
                rule = "by_role"
            if tid is not None:
                new[sid] = old[tid]
                counts[rule] += 1
                continue
        elif sb in teacher_id_by_bytes:
            new[sid] = old[teacher_id_by_bytes[sb]]
            counts["copied"] += 1
            continue
        elif sb:
            ids = _decompose(teacher_tokenizer, teacher_vocab, sb, num_old, teacher_id_by_bytes)
            if ids:
                new[sid] = old[ids].mean(dim=0)
                counts["averaged"] += 1
                continue
        new[sid] = mean + std * torch.randn(old.shape[1], generator=generator)
        counts["random"] += 1
    report = TransferReport(
        counts["copied"],
        counts["by_string"],
        counts["by_role"],
        counts["averaged"],
        counts["random"],
    )
    return new.to(old_embeddings.dtype), report


def _decompose(
    teacher_tokenizer: Any,
    teacher_vocab: Vocab,
    token_bytes: bytes,
    num_old: int,
    teacher_id_by_bytes: dict[bytes, int],
) -> list[int]:
    """Teacher ids whose bytes concatenate to `token_bytes` ([] if there is no such decomposition).

    Valid UTF-8 stretches go through the teacher tokenizer; a byte outside them (a token holding part of a
    multi-byte character) must be a teacher token on its own (byte-level BPE alphabet, SentencePiece byte
    fallback).
    """
    ids: list[int] = []
    start = 0
    while start < len(token_bytes):
        stop = len(token_bytes)
        while stop > start:
            try:
                token_bytes[start:stop].decode("utf-8")
                break
            except UnicodeDecodeError:
                stop -= 1
        if stop > start:
            try:
                encoded = encode_text(teacher_tokenizer, teacher_vocab, token_bytes[start:stop])
            except (TokenizerRefusedError, DataError):
                return []
            ids.extend(encoded.token_id.tolist())
            start = stop
        else:
            single = teacher_id_by_bytes.get(token_bytes[start : start + 1])
            if single is None:
                return []
            ids.append(single)
            start += 1
    return ids if ids and all(i < num_old for i in ids) else []


def _embedding_weight(module: nn.Module) -> torch.Tensor:
    """The `weight` of an embedding or LM-head module (`nn.Module.__getattr__` types it `Tensor | Module`)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def transfer_model(
    model: PreTrainedModel,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    untie_embeddings: bool,
    seed: int,
) -> TransferReport:
    """Move `model` (the teacher) to `student_tokenizer` in place: new embeddings, untied if asked.

    Returns:
        the input-embedding transfer report.
    """
    teacher_vocab = vocab_from_tokenizer(teacher_tokenizer)
    student_vocab = vocab_from_tokenizer(student_tokenizer)
    generator = torch.Generator().manual_seed(seed)
    old_in = _embedding_weight(model.get_input_embeddings())
    old_out_module = model.get_output_embeddings()
    was_tied = old_out_module is not None and _embedding_weight(old_out_module) is old_in
    new_in, report = transfer_embeddings(
        old_in, teacher_tokenizer, teacher_vocab, student_vocab, generator
    )
    num_new, dim = new_in.shape
    in_module = nn.Embedding(num_new, dim, dtype=old_in.dtype)
    in_module.weight.data.copy_(new_in)
    keep_tied = was_tied and not untie_embeddings
    out_module = None
    if old_out_module is not None:
        out_module = nn.Linear(dim, num_new, bias=False, dtype=old_in.dtype)
        if keep_tied:
            out_module.weight = in_module.weight
        else:
            # Untie from the same start when the teacher was tied; else transfer its own output matrix.
            new_out = (
                new_in.clone()
                if was_tied
                else transfer_embeddings(
                    _embedding_weight(old_out_module),
                    teacher_tokenizer,
                    teacher_vocab,
                    student_vocab,
                    generator,
                )[0]
            )
            out_module.weight.data.copy_(new_out)
    model.set_input_embeddings(in_module)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.vocab_size = num_new
        config.tie_word_embeddings = keep_tied
        for attr, token in (
            ("bos_token_id", "bos_token"),
            ("eos_token_id", "eos_token"),
            ("pad_token_id", "pad_token"),
        ):
            if hasattr(config, attr):
                value = getattr(student_tokenizer, token, None)
                setattr(
                    config, attr, student_tokenizer.convert_tokens_to_ids(value) if value else None
                )
    if out_module is not None:
        model.set_output_embeddings(out_module)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(generation_config, attr, getattr(model.config, attr, None))
    logger.info(
        "tokenizer transfer to %d tokens: %d copied, %d special by string, %d special by role, %d averaged, "
        "%d random%s",
        num_new,
        report.num_copied,
        report.num_special_by_string,
        report.num_special_by_role,
        report.num_averaged,
        report.num_random,
        " (untied)" if not keep_tied else "",
    )
    return report


def resolve_model_path(name: str) -> str:
    """A teacher model name from a store manifest as something `from_pretrained` loads (`builtin:` ids resolved)."""
    from alm.teacher.default import resolve_teacher_path

    return resolve_teacher_path(name)


@dataclass
class StudentTokenizer:
    """The student's tokenizer before any model loads: the tokenizer, its bytes, the template family it renders,
    and for a transfer the model it moves and that model's (teacher) tokenizer."""

    tokenizer: Any
    vocab: Vocab
    family: str
    source: str
    teacher_tokenizer: Any | None = None


def load_student_tokenizer(cfg: StudentConfig, *, teacher_model: str | None) -> StudentTokenizer:
    """The student tokenizer described by `cfg`, checked (bytes reproduced, template family), without a model.

    `alm train --dry-run` stops here; `load_student` goes on to the model.

    Args:
        cfg: the recipe's `student` section.
        teacher_model: the model id/path recorded in the store (used by `transfer.from: teacher`).

    Raises:
        ConfigError: a tokenizer cannot be loaded, or `from: teacher` with no teacher recorded.
        TokenizerRefusedError: the tokenizer cannot reproduce the bytes of a text (WordPiece, NFKC, no byte
            fallback, ...).
    """
    if cfg.transfer is None:
        assert cfg.model is not None
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        if cfg.strip_unicode_normalizer:
            tokenizer = without_unicode_normalizer(tokenizer)
        vocab = vocab_from_tokenizer(tokenizer)
        return StudentTokenizer(tokenizer, vocab, resolve_family(cfg.family, tokenizer), cfg.model)
    source = cfg.transfer.from_
    if source == "teacher":
        if not teacher_model:
            raise ConfigError(
                "student.transfer.from: teacher, but the store records no teacher model; give a path"
            )
        source = resolve_model_path(teacher_model)
    teacher_tokenizer = load_tokenizer(source)
    if cfg.transfer.tokenizer == "bytes":
        student_tokenizer = byte_tokenizer_like(teacher_tokenizer)
    else:
        student_tokenizer = load_tokenizer(cfg.transfer.tokenizer)
        if cfg.strip_unicode_normalizer:
            student_tokenizer = without_unicode_normalizer(student_tokenizer)
        if cfg.transfer.special_tokens == "teacher":
            student_tokenizer = with_teacher_special_tokens(student_tokenizer, teacher_tokenizer)
    # With the teacher's special tokens the student speaks the teacher's template, even where it also has its own
    # family's markers (detection would pick e.g. chatml from a Qwen2 tokenizer carrying Llama-3's specials).
    keeps_teacher_specials = (
        cfg.transfer.tokenizer == "bytes" or cfg.transfer.special_tokens == "teacher"
    )
    if keeps_teacher_specials and not getattr(teacher_tokenizer, "chat_template", None):
        # no teacher template to speak: the teacher's family, from its markers (the student's own template, if
        # any, is not what the teacher speaks)
        family = resolve_family(cfg.family, teacher_tokenizer)
    else:  # the student tokenizer carries the teacher's template, or its own
        family = resolve_family(
            cfg.family,
            student_tokenizer,
            markers_from=teacher_tokenizer if keeps_teacher_specials else None,
        )
    vocab = vocab_from_tokenizer(student_tokenizer)
    logger.info(
        "student renders the %s template family (%s special tokens)",
        family,
        "the teacher's" if keeps_teacher_specials else "its own",
    )
    return StudentTokenizer(student_tokenizer, vocab, family, source, teacher_tokenizer)


def load_student(
    cfg: StudentConfig,
    *,
    teacher_model: str | None,
    seed: int,
    tokenizer: StudentTokenizer | None = None,
) -> Student:
    """Build the student described by `cfg`: its tokenizer (`load_student_tokenizer`), then the model.

    Args:
        cfg: the recipe's `student` section.
        teacher_model: the model id/path recorded in the store (used by `transfer.from: teacher`).
        seed: seed for the transfer's random draws.
        tokenizer: the result of `load_student_tokenizer(cfg, ...)` when already loaded.

    Raises:
        ConfigError: a model or tokenizer cannot be loaded, or `from: teacher` with no teacher recorded.
        TokenizerRefusedError: the student tokenizer cannot reproduce the bytes of a text.
    """
    tok = tokenizer or load_student_tokenizer(cfg, teacher_model=teacher_model)
    model = load_causal_lm(tok.source)
    if tok.teacher_tokenizer is None:
        num_embeddings = _embedding_weight(model.get_input_embeddings()).shape[0]
        if num_embeddings < len(tok.vocab.token_bytes):
            raise ConfigError(
                f"student tokenizer has {len(tok.vocab.token_bytes)} tokens but the model only "
                f"{num_embeddings} embeddings; use student.transfer to move a "
                "model to a new tokenizer"
            )
    else:
        assert cfg.transfer is not None
        teacher_embeddings = _embedding_weight(model.get_input_embeddings()).detach().clone()
        transfer_model(
            model,
            tok.teacher_tokenizer,
            tok.tokenizer,
            untie_embeddings=cfg.transfer.untie_embeddings,
            seed=seed,
        )
        if cfg.transfer.ngram_embeddings:
            model = with_ngram_embeddings(
                model, teacher_embeddings, vocab_from_tokenizer(tok.teacher_tokenizer), tok.vocab
            )
    return Student(model, tok.tokenizer, tok.vocab, tok.source, tok.family)


def with_ngram_embeddings(
    model: PreTrainedModel,
    teacher_embeddings: torch.Tensor,
    teacher_vocab: Vocab,
    student_vocab: Vocab,
    max_bytes: int = NGRAM_MAX_BYTES,
) -> PreTrainedModel:
    """The byte student `model` as `AlmNgramLlamaForCausalLM`: same weights, plus the frozen n-gram table.

    Args:
        model: the transferred byte student (a `LlamaForCausalLM`).
        teacher_embeddings: float [V_teacher', d], the teacher's input embeddings before transfer.
        teacher_vocab: the teacher tokenizer as bytes (row i of the table is teacher id i).
        student_vocab: the byte tokenizer as bytes.
        max_bytes: the longest look-back (ALM_SPEC §8: 16).

    Raises:
        ConfigError: the model is not a Llama-architecture causal LM.
    """
    from alm.train.ngram_model import AlmNgramLlamaConfig, AlmNgramLlamaForCausalLM, NgramEmbedding

    if type(model).__name__ != "LlamaForCausalLM":
        raise ConfigError(
            f"student.transfer.ngram_embeddings supports Llama-architecture teachers; this one is "
            f"{type(model).__name__}. Set ngram_embeddings: false"
        )
    num_rows = min(teacher_embeddings.shape[0], teacher_vocab.size)
    token_hex = [
        tb.hex() if tb and not teacher_vocab.is_special[i] and len(tb) <= max_bytes else ""
        for i, tb in enumerate(teacher_vocab.token_bytes[:num_rows])
    ]
    byte_of_id = [
        -1 if student_vocab.is_special[i] or len(tb) != 1 else tb[0]
        for i, tb in enumerate(student_vocab.token_bytes)
    ]
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type",)}
    config = AlmNgramLlamaConfig(
        ngram_token_hex=token_hex, byte_of_id=byte_of_id, ngram_max_bytes=max_bytes, **settings
    )
    ngram_model = AlmNgramLlamaForCausalLM(config)  # fp32, as `load_causal_lm` loads
    missing, unexpected = ngram_model.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {
        "model.embed_tokens.ngram_weight",
        "lm_head.weight",
    }, (
        missing,
        unexpected,
    )
    embedding = ngram_model.model.embed_tokens
    assert isinstance(embedding, NgramEmbedding)
    with torch.no_grad():
        embedding.ngram_weight.copy_(teacher_embeddings[:num_rows])
    return ngram_model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each block's activations in the backward pass (`student.gradient_checkpointing`).

    Non-reentrant checkpointing, so `torch.autograd.grad` on the last block (GradMag), LoRA and FSDP2 work as
    without it; the KV cache is off while training.

    Raises:
        ConfigError: the model class does not support gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"student.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "set it to false"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    logger.info("gradient checkpointing on (non-reentrant)")


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with LoRA adapters (embeddings trained fully when `cfg.train_embeddings`).

    Raises:
        BackendUnavailableError: `peft` is not installed.
        ConfigError: none of the target modules exist in the model.
    """
    try:
        import peft
    except ImportError:
        raise BackendUnavailableError(
            "LoRA needs peft: pip install 'alm[lora]' (or remove the `lora` section for full fine-tuning)"
        ) from None
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in module_names]
    if len(missing) == len(cfg.targets):
        raise ConfigError(
            f"lora.targets {cfg.targets} match no module of the student; it has e.g. "
            f"{sorted(module_names)[:12]}"
        )
    to_save = []
    if cfg.train_embeddings:
        by_id = {id(m): n for n, m in model.named_modules()}
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and id(module) in by_id:
                to_save.append(by_id[id(module)].rsplit(".", 1)[-1])
    lora_config = peft.LoraConfig(
        r=cfg.r,
        # peft annotates lora_alpha as int but only uses it in the scale alpha / r: a float works
        lora_alpha=cfg.alpha,  # pyright: ignore[reportArgumentType]
        lora_dropout=cfg.dropout,
        target_modules=[t for t in cfg.targets if t in module_names],
        modules_to_save=sorted(set(to_save)) or None,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora_config)


def set_chat_template(model: PreTrainedModel, tokenizer: Any, family: str) -> None:
    """Make the student's tokenizer and generation config speak the chat family it was trained in.

    `role_prefix` gets its template only. For a chat family (`chatml`, `llama3`, `gemma`): `tokenizer.chat_template`
    becomes the family's exact rendering (`alm.templates.family_chat_template`, so `apply_chat_template` gives the
    text training rendered), `eos_token` its end-of-turn (e.g. `<|im_end|>`, as instruct models ship), and
    generation stops at the end-of-turn or the previous eos. A template family (`template:<base>`) keeps the
    tokenizer's own template, the one training rendered with, and takes its end-of-turn from it
    (`alm.templates.template_end_of_turn`: the special token closing an assistant turn); a template whose turns
    end in plain text keeps the eos. `plain` changes nothing.
    """
    if is_template_family(family):
        template = None  # the tokenizer's own stays
        try:
            end_of_turn = template_end_of_turn(tokenizer)
        except (
            TokenizerRefusedError
        ) as err:  # it rendered the training data, so this is not expected
            logger.warning(
                "saved student keeps its eos: no end-of-turn found in its template (%s)", err
            )
            return
        if end_of_turn is None:
            return
    else:
        template = family_chat_template(family)
        end_of_turn = FAMILY_END_OF_TURN.get(family)
        if template is None:
            return
        if end_of_turn is None:  # `role_prefix`: turns end in plain text, the eos stays as it is
            tokenizer.chat_template = template
            return
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if end_id is None or end_id == tokenizer.unk_token_id:
        return  # the tokenizer cannot render this family's chat blocks: it was not trained on chat
    previous_eos = tokenizer.eos_token_id
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.eos_token = end_of_turn
    stop_ids = list(dict.fromkeys(i for i in (end_id, previous_eos) if i is not None))
    model.generation_config.eos_token_id = stop_ids
    model.config.eos_token_id = end_id
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info(
        "saved student: %s chat template, eos %s (generation stops at ids %s)",
        family,
        end_of_turn,
        stop_ids,
    )


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_student(
    model: nn.Module,
    tokenizer: Any,
    path: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    fold_input_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Save the final student (LoRA merged) and its tokenizer so `from_pretrained` loads the folder.

    Args:
        model: the trained student (a peft model is merged first).
        tokenizer: its tokenizer.
        path: the folder.
        state_dict: full, unsharded weights, used for FSDP2-sharded models; otherwise the model's own are saved.
        dtype: floating-point weights are saved in this dtype (`save_dtype`); `config.json` records it.
        family: the template family the student was trained in; a chat family is saved as its chat template
            and end-of-turn (`set_chat_template`).
        fold_input_embeddings: maps the trained input-embedding table [V, d] to the one the saved model uses
            (the embedding projector's `W + P(W)`, `alm.train.embedding_projector.fold_embedding_table`).
    """
    from transformers import PreTrainedModel

    merge_and_unload = getattr(model, "merge_and_unload", None)
    if merge_and_unload is not None:
        model = merge_and_unload()
        state_dict = None
    elif state_dict is not None and not any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    ):
        state_dict = None
    assert isinstance(model, PreTrainedModel)
    state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    if fold_input_embeddings is not None:
        in_key = {id(m): n for n, m in model.named_modules()}[id(model.get_input_embeddings())]
        out_module = model.get_output_embeddings()
        assert out_module is None or _embedding_weight(out_module) is not _embedding_weight(
            model.get_input_embeddings()
        ), "a folded input table must not be tied to the output head"
        state_dict[f"{in_key}.weight"] = fold_input_embeddings(state_dict[f"{in_key}.weight"])
    # tied weights (one storage under two names) stay one tensor, so save_pretrained still sees them tied
    converted: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in state_dict.items():
        if value.is_floating_point():
            memo = (value.data_ptr(), tuple(value.shape), value.stride(), value.device)
            state_dict[key] = converted.setdefault(memo, value.detach().to(dtype))
    if family is not None:
        set_chat_template(model, tokenizer, family)
    path.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # off while training with gradient checkpointing
    model.save_pretrained(path, state_dict=state_dict)
    # save_pretrained records the dtype of the model in memory (fp32 master weights); record the saved one
    model.config.dtype = dtype
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def push_student(folder: Path, repo_id: str, *, private: bool) -> str:
    """Upload the saved student `folder` to the Hugging Face Hub repo `repo_id` (`push_to_hub`).

    Creates the repo when missing (private when `private`); the token comes from `HF_TOKEN` or `hf auth login`.

    Returns:
        the URL of the upload's commit.

    Raises:
        BackendUnavailableError: the upload failed (the student stays saved in `folder`; the message says how to
            upload it by hand).
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="alm train: the final student",
        )
    except (
        Exception
    ) as err:  # network, authentication, permissions: all leave the saved student as it is
        raise BackendUnavailableError(
            f"push_to_hub: uploading {folder} to {repo_id!r} failed ({type(err).__name__}: {err}); the student "
            f"is saved there: upload it with `hf upload {repo_id} {folder}`"
        ) from None
    url = str(getattr(commit, "commit_url", commit))
    logger.info("student pushed to the Hub: %s", url)
    return url
