"""alm: offline cross-tokenizer distillation with Approximate Likelihood Matching (arXiv 2503.20083).

Public API (imported lazily so that `import alm` stays cheap):

- `alm.open_store(path)`: read a teacher store.
- `alm.align_chunks(teacher_tokens, student_tokens, ...)`: greedy chunks between two tokenizations.
- `alm.binarised_divergence(teacher_logp, student_logp, ...)`: the per-chunk ALM divergence.
- `alm.alm_loss(...)`: the whole ALM loss for a batch.
- `alm.vocab_from_tokenizer(tokenizer)`: a tokenizer as bytes.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_store": "alm.store.reader",
    "align_chunks": "alm.align",
    "binarised_divergence": "alm.losses.alm",
    "alm_loss": "alm.losses.alm",
    "vocab_from_tokenizer": "alm.vocab",
    "Vocab": "alm.vocab",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alm' has no attribute {name!r}")


__all__ = list(_EXPORTS)
