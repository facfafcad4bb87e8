"""Byte students with n-gram input embeddings (paper App. C, ALM_SPEC §8 `expand_input_ids`), as HF modelling code.

Each byte's input embedding gets the frozen embedding, in the teacher's original tokenizer, of the longest teacher
subword whose bytes end at that byte (looking back at most `ngram_max_bytes` = 16 bytes, never across a special
token): BLT-style n-gram embeddings. The lookup needs the bytes before each position, so it cannot be folded into
a plain embedding matrix. This file is therefore the student's modelling code: `alm train` trains the same classes
and `save_pretrained` copies this file into the student folder with an `auto_map`, so the saved student loads with
plain transformers and `trust_remote_code=True`:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

**Self-contained**: imports only torch and transformers (never `alm`), because it runs from the student folder.
Llama-architecture students only (the teacher families of the reproduction recipes). Generation with a KV cache
works: the embedding keeps the last 15 ids of each row and continues from them while the cache is non-empty.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class AlmNgramLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus the n-gram table's keys.

    Attributes:
        ngram_token_hex: per teacher id, the hex of its bytes ("" for ids never matched: specials, longer tokens).
        byte_of_id: per student id, its byte value 0-255, or -1 for a special token.
        ngram_max_bytes: the longest look-back in bytes (16 in the paper).
    """

    model_type = "alm_ngram_llama"

    def __init__(
        self,
        ngram_token_hex: list[str] | None = None,
        byte_of_id: list[int] | None = None,
        ngram_max_bytes: int = 16,
        **kwargs: Any,
    ) -> None:
        self.ngram_token_hex = list(ngram_token_hex or [])
        self.byte_of_id = list(byte_of_id or [])
        self.ngram_max_bytes = ngram_max_bytes
        super().__init__(**kwargs)


class NgramEmbedding(nn.Module):
    """Byte embedding (trained, `weight`) plus the frozen teacher embedding of the longest subword ending there."""

    ngram_weight: torch.Tensor

    def __init__(self, config: AlmNgramLlamaConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size))
        self.register_buffer(
            "ngram_weight", torch.zeros(len(config.ngram_token_hex), config.hidden_size)
        )  # [V_teacher, d], frozen (a buffer: never in the optimizer)
        self.byte_of_id = [int(b) for b in config.byte_of_id]
        self.max_bytes = int(config.ngram_max_bytes)
        self.table: dict[bytes, int] = {}
        for teacher_id, token_hex in enumerate(config.ngram_token_hex):
            if token_hex:
                self.table.setdefault(bytes.fromhex(token_hex), teacher_id)
        self.continue_context = (
            False  # set by the model: True while a KV cache holds earlier tokens
        )
        self._context: list[list[int]] = []

    def ngram_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, T]: the teacher id of the longest subword ending at each byte, -1 where none (specials).

        With `continue_context` the last `max_bytes - 1` ids of the previous call precede each row.
        """
        rows = input_ids.tolist()
        keep_context = self.continue_context and len(self._context) == len(rows)
        out, contexts = [], []
        for b, row in enumerate(rows):
            prefix = self._context[b] if keep_context else []
            ids = prefix + row
            window: list[int] = []  # the bytes since the last special, at most max_bytes
            found = []
            for token in ids:
                byte = self.byte_of_id[token] if 0 <= token < len(self.byte_of_id) else -1
                if byte < 0:
                    window = []
                    found.append(-1)
                    continue
                window = [*window[-(self.max_bytes - 1) :], byte]
                match = -1
                for length in range(len(window), 0, -1):
                    match = self.table.get(bytes(window[-length:]), -1)
                    if match >= 0:
                        break
                found.append(match)
            out.append(found[len(prefix) :])
            contexts.append(ids[-(self.max_bytes - 1) :])
        self._context = contexts
        return torch.tensor(out, dtype=torch.long, device=input_ids.device).reshape(input_ids.shape)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ngram = self.ngram_ids(input_ids)  # [B, T]
        embedded = nn.functional.embedding(input_ids, self.weight)  # [B, T, d]
        extra = self.ngram_weight[ngram.clamp(min=0)] * (ngram >= 0).unsqueeze(-1)  # [B, T, d]
        return embedded + extra.to(embedded.dtype)


class AlmNgramLlamaForCausalLM(LlamaForCausalLM):
    """A Llama causal LM whose input embedding is `NgramEmbedding`."""

    config_class = AlmNgramLlamaConfig

    def __init__(self, config: AlmNgramLlamaConfig) -> None:
        super().__init__(config)
        embedding = NgramEmbedding(config)
        self.model.embed_tokens = embedding  # pyright: ignore[reportAttributeAccessIssue]
        if config.tie_word_embeddings:
            self.lm_head.weight = embedding.weight

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        """`LlamaForCausalLM.forward`; the n-gram look-back continues while the KV cache is non-empty."""
        past_key_values = kwargs.get("past_key_values")
        continue_context = past_key_values is not None and past_key_values.get_seq_length() > 0
        # every n-gram embedding under embed_tokens: itself, or the copies a LoRA (peft) wrapper trains
        embeddings = [m for m in self.model.embed_tokens.modules() if isinstance(m, NgramEmbedding)]
        assert embeddings, "the input embedding of an n-gram student is an NgramEmbedding"
        for embedding in embeddings:
            embedding.continue_context = continue_context
        return super().forward(*args, **kwargs)


AlmNgramLlamaConfig.register_for_auto_class()
AlmNgramLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
