"""`alm eval`: load the models, score the same held-out bytes with each, compare with a teacher store, report.

    alm eval runs/demo/student_bytes/student builtin:smollm2-135m-instruct --data data_specs/stdlib_docs_heldout.yaml
    alm eval A B --data heldout.txt --teacher-store runs/demo/teacher_store_heldout --json eval.json
    alm eval ensemble.yaml --data heldout.jsonl          # an ensemble recipe scores like one model

`evaluate_models` is the library entry point (the CLI is a thin shell over `run_eval_cli`); the in-training
evaluation calls `score_texts` from `alm.eval.score` on the same texts. Imports `alm.eval.*`; prints nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alm.eval.agreement import Agreement, read_store_sequences, store_agreement
from alm.eval.models import Combine, Ensemble, Scorer, ScoringModel, load_model
from alm.eval.score import TextScores, score_texts
from alm.eval.texts import EvalText, load_eval_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelResult:
    """One row of an evaluation."""

    model: str
    bits_per_byte: float
    nll_nats: float
    num_bytes: int
    num_tokens: int
    bytes_per_token: float
    context: str
    agreement: Agreement | None = None


@dataclass(frozen=True)
class EvalReport:
    """What `alm eval` prints and writes as JSON."""

    data: str
    num_texts: int
    num_bytes: int
    max_bytes: int
    teacher_store: str | None
    results: list[ModelResult]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _context_name(scorer: Scorer) -> str:
    ids = [int(i) for i in scorer.context_ids]
    return " ".join(scorer.vocab.special_text.get(i, str(i)) for i in ids)


def evaluate_models(
    scorers: Sequence[Scorer],
    texts: Sequence[EvalText],
    *,
    data_name: str = "texts",
    max_bytes: int = 0,
    teacher_store: str | None = None,
    store_limit: int | None = None,
    token_budget: int = 4096,
    progress: bool = False,
) -> EvalReport:
    """Bits per byte of each model on `texts` (and agreement with `teacher_store` when given).

    Args:
        scorers: loaded models or ensembles (`alm.eval.models`).
        texts: the held-out pieces (`alm.eval.texts.load_eval_texts`).
        data_name: label of the data in the report.
        max_bytes: the piece size the texts were cut with (recorded).
        teacher_store: a teacher store for chunk agreement and binarised KL.
        store_limit: at most this many stored sequences.
        token_budget: padded tokens per forward pass.
        progress: tqdm bars.
    """
    stored = read_store_sequences(teacher_store, store_limit) if teacher_store else None
    results = []
    for scorer in scorers:
        scores: TextScores = score_texts(
            scorer, texts, token_budget=token_budget, progress=progress
        )
        agreement = (
            store_agreement(
                scorer,
                teacher_store,
                sequences=stored,
                token_budget=token_budget,
                progress=progress,
            )
            if teacher_store
            else None
        )
        results.append(
            ModelResult(
                model=scorer.name,
                bits_per_byte=scores.bits_per_byte,
                nll_nats=float(scores.nll_nats.sum()),
                num_bytes=int(scores.num_bytes.sum()),
                num_tokens=int(scores.num_tokens.sum()),
                bytes_per_token=scores.bytes_per_token,
                context=_context_name(scorer),
                agreement=agreement,
            )
        )
        logger.info("%s: %.4f bits/byte", scorer.name, scores.bits_per_byte)
    return EvalReport(
        data=data_name,
        num_texts=len(texts),
        num_bytes=sum(len(t.text) for t in texts),
        max_bytes=max_bytes,
        teacher_store=teacher_store,
        results=results,
    )


def format_table(report: EvalReport) -> str:
    """The report as an aligned text table (one row per model)."""
    header = ["model", "bits/byte", "bytes/token", "tokens", "context"]
    if report.teacher_store:
        header += ["|Δ chunk logp|", "binarised KL"]
    rows = []
    for r in report.results:
        row = [
            r.model,
            f"{r.bits_per_byte:.4f}",
            f"{r.bytes_per_token:.2f}",
            str(r.num_tokens),
            r.context,
        ]
        if r.agreement is not None:
            row += [f"{r.agreement.chunk_abs_logp_diff:.4f}", f"{r.agreement.binarised_kl:.3g}"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    summary = f"{report.num_texts} texts, {report.num_bytes} bytes of {report.data}"
    if report.teacher_store:
        a = next((r.agreement for r in report.results if r.agreement), None)
        if a is not None:
            summary += (
                f"; teacher store {report.teacher_store}: {a.num_sequences} sequences, {a.num_chunks} chunks, "
                f"{a.num_groups} groups (τ={a.temperature:g}, γ={a.gamma:g})"
            )
    return "\n".join([*lines, summary])


def run_eval_cli(
    models: Sequence[str],
    data: str,
    *,
    teacher_store: str | None = None,
    json_out: Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    max_bytes: int = 4096,
    ensemble: bool = False,
    combine: Combine = "probs",
    device: str = "cpu",
    token_budget: int = 4096,
) -> str:
    """What `alm eval` does; returns the table to print.

    Raises:
        AlmError: bad data, a model that cannot be loaded, mismatched ensemble tokenizers, a bad store.
    """
    texts = load_eval_texts(data, split=split, limit=limit, max_bytes=max_bytes)
    scorers: list[Scorer] = [load_model(name, device) for name in models]
    if ensemble:
        members = [s for s in scorers if isinstance(s, ScoringModel)]
        scorers.append(Ensemble(f"ensemble({combine})", members, combine))
    report = evaluate_models(
        scorers,
        texts,
        data_name=str(data),
        max_bytes=max_bytes,
        teacher_store=teacher_store,
        token_budget=token_budget,
        progress=True,
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return format_table(report)


__all__ = ["EvalReport", "ModelResult", "evaluate_models", "format_table", "run_eval_cli"]
