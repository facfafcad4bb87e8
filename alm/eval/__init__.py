"""Held-out evaluation that compares models with different tokenizers: bits per byte on the same bytes, agreement
with a teacher store, and ensembles of models sharing a tokenizer (docs/evaluation.md).

- `alm.eval.texts`: the held-out pieces (`load_eval_texts`), cut from the bytes alone;
- `alm.eval.models`: one HF model (`load_model`, `scoring_model`) or an `Ensemble`, the context-token rule,
  `generate`;
- `alm.eval.score`: `score_texts` (summed NLL per text) and `bits_per_byte`;
- `alm.eval.agreement`: `store_agreement` (chunk agreement, binarised KL against a teacher store);
- `alm.eval.run`: `evaluate_models`, the table and the CLI's `run_eval_cli`.

Layer: above `alm.teacher | alm.data`, below `alm.train` (whose held-out evaluation uses `score_texts`).
"""

from alm.eval.agreement import Agreement, store_agreement
from alm.eval.models import (
    Ensemble,
    ScoringModel,
    combine_logits,
    generate,
    load_ensemble,
    load_model,
    scoring_model,
)
from alm.eval.run import EvalReport, ModelResult, evaluate_models, format_table
from alm.eval.score import TextScores, bits_per_byte, score_texts
from alm.eval.texts import EvalText, load_eval_texts, split_text

__all__ = [
    "Agreement",
    "Ensemble",
    "EvalReport",
    "EvalText",
    "ModelResult",
    "ScoringModel",
    "TextScores",
    "bits_per_byte",
    "combine_logits",
    "evaluate_models",
    "format_table",
    "generate",
    "load_ensemble",
    "load_eval_texts",
    "load_model",
    "score_texts",
    "scoring_model",
    "split_text",
    "store_agreement",
]
