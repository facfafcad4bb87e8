"""The optional embedding projector of tokenizer transfer (ALM_SPEC §8; tokenkit's `hypernet.architecture`).

A residual map on the student's new (transferred) input embeddings, trained with the student:

    E' = E + P(E)        P applied to each row of the input-embedding table on its own

- `identity`: no projector (tokenkit's examples, the default);
- `linear`: P(e) = A e + b;
- `mlp`: P(e) = W2 gelu(W1 LayerNorm(e) + b1) + b2, hidden width 2d (tokenkit's `hidden_expansion_factor`).

The residual branch's last layer (A, b; W2, b2) starts at zero, so at step 0 the student is exactly the
un-projected one (P(e) = 0 exactly, e + 0 = e). tokenkit's default `transformer` hypernet runs a small transformer
over a sequence of embeddings per new token; given one embedding per token (its transferred row, as here),
attention over one element reduces to a value projection, so a one-layer block is close to the residual `mlp`
above (we leave out tokenkit's in/out rescalers and its residual scale).

**Foldable.** P sees one row at a time and nothing else (no position, no context, no other row), so the trained
student's input embeddings are the table `W + P(W)`, which `fold_embedding_table` materialises when the student is
saved: the saved folder is a plain model of the student's class (the n-gram byte student keeps its own class,
`alm.train.ngram_model`), with no projector. Training computes P on the rows a batch looks up (cheaper than the
whole table per step); the two orders round differently by a few fp32 ulps. This holds for input embeddings whose
output is the looked-up row plus terms that do not depend on the table (`nn.Embedding`, and the n-gram embedding,
which adds its frozen n-gram rows): `make_embedding_projector` refuses others (an embedding that scales its rows,
as Gemma 3's does, would scale P too). The projector changes the input embeddings only, so the recipe requires
untied input and output embeddings (`alm.config.train.TransferConfig`).

Owned by `alm.train.step.TrainModule` (so DDP/FSDP2 wrap it with the student and LoRA never freezes it). Never
imports `torch.distributed`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from alm.errors import ConfigError
from alm.train.ngram_model import NgramEmbedding

ProjectorKind = Literal["identity", "linear", "mlp"]
MLP_EXPANSION = 2  # hidden width = 2 d (tokenkit's `hidden_expansion_factor`)


class EmbeddingProjector(nn.Module):
    """The residual branch P of `E' = E + P(E)`, row by row; zero at initialisation."""

    def __init__(self, kind: Literal["linear", "mlp"], width: int) -> None:
        super().__init__()
        self.kind: Literal["linear", "mlp"] = kind
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(width, width))
        else:
            self.layers = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, MLP_EXPANSION * width),
                nn.GELU(),
                nn.Linear(MLP_EXPANSION * width, width),
            )
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # residual branch off at step 0
        nn.init.zeros_(last.bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """P(rows): float [..., d] embedding rows -> float [..., d] (added to the rows by the caller)."""
        return self.layers(rows)


def make_embedding_projector(
    kind: ProjectorKind, input_embedding: nn.Module, width: int
) -> EmbeddingProjector | None:
    """The projector of `student.transfer.embedding_projector` for a student whose input embedding is
    `input_embedding` (None for `identity`).

    Raises:
        ConfigError: the input embedding is not a plain lookup (`nn.Embedding`) or the n-gram byte embedding, so
            `E + P(E)` could not be folded into the saved table.
    """
    if kind == "identity":
        return None
    if type(input_embedding) not in (nn.Embedding, NgramEmbedding):
        raise ConfigError(
            f"student.transfer.embedding_projector: {kind} needs an input embedding that looks its rows up "
            f"unchanged (nn.Embedding, or the n-gram byte embedding); this student's is "
            f"{type(input_embedding).__name__}, which the saved table could not reproduce. Set "
            "embedding_projector: identity"
        )
    return EmbeddingProjector(kind, width)


def fold_embedding_table(
    table: torch.Tensor, kind: Literal["linear", "mlp"], projector_state: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The input-embedding table the trained student uses: `W + P(W)`, for the saved model.

    Args:
        table: float [V, d] the trained input-embedding table W (full, unsharded).
        kind: the projector's kind.
        projector_state: the trained projector's full state dict (`EmbeddingProjector.state_dict()` keys).

    Returns:
        float [V, d] in `table`'s dtype.
    """
    projector = EmbeddingProjector(kind, table.shape[1])
    projector.load_state_dict({k: v.detach().cpu().float() for k, v in projector_state.items()})
    with torch.no_grad():
        weight = table.detach().cpu().float()
        return (weight + projector(weight)).to(table.dtype)  # [V, d]
