"""The reproduction study of issue 14 (docs/reproduction.md), driven by `stages/repro_study.yaml`.

    scripts/reproduce.sh                          # the whole study (long: run it alone on the machine)
    .venv/bin/python scripts/reproduce.py --quick --root /tmp/r --docs /tmp/r/docs   # minutes, same pipeline

Steps, each skipped when its output is already complete (so rerunning the command continues the study):

1. `alm precompute` the training store and the in-domain held-out store with the real SmolLM2-135M-Instruct;
2. train a byte-level BPE locally on another corpus (the installed packages' descriptions, `METADATA`), keeping
   the teacher's special tokens;
3. build each student's initial model once (the teacher moved to bytes / to that BPE: exactly the init every run
   of that student starts from) and save it for evaluation;
4. `alm train` every student x method (and the learning-rate sweep) from the same recipe, changing only the
   method's overrides (and `optim.lr`), with `OMP_NUM_THREADS` set to the study's thread count;
5. `alm eval`'s library on the teacher, the initial and the trained students, on in-domain held-out text and on
   out-of-domain text that is in no store;
6. write `reproduction.md`, `reproduction.json` and one `alm report` PNG per student (held-out bits per byte from
   the in-training evaluation, against the step, per method) into the docs folder.

Not part of the `alm` package: it only calls the CLI and the public library, as a user would.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("reproduce")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSet(_Strict):
    data: str
    limit: int | None = None
    max_bytes: int = 2048
    pieces_per_document: int | None = Field(default=None, ge=1)


class StudentPlan(_Strict):
    recipe: str
    methods: list[str]


class Quick(_Strict):
    precompute: list[str] = []
    precompute_heldout: list[str] = []
    train: list[str] = []
    students: dict[str, list[str]] = {}
    lr_factors: int = Field(default=1, ge=1)
    bpe_vocab_size: int = 1024
    eval_limit: int = 3
    eval_max_bytes: int = 256


class Study(_Strict):
    root: str
    docs: str
    threads: int = Field(default=2, ge=1)
    precompute: dict[str, str]
    bpe_tokenizer: dict[str, int]
    students: dict[str, StudentPlan]
    methods: dict[str, list[str]]
    lr_sweep: dict[str, list[Any]]
    eval: dict[str, EvalSet]
    quick: Quick


def load_study(path: str | Path = REPO / "stages" / "repro_study.yaml") -> Study:
    study = Study.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    unknown = [
        m for plan in study.students.values() for m in plan.methods if m not in study.methods
    ]
    unknown += [m for m in study.lr_sweep.get("methods", []) if m not in study.methods]
    if unknown:
        raise ValueError(f"{path}: methods {unknown} are not defined under `methods:`")
    return study


def run_plan(study: Study, root: Path, quick: bool) -> list[dict[str, Any]]:
    """Every training run of the study: student, method, lr factor, recipe, overrides, output folder."""
    runs = []
    for student, plan in study.students.items():
        base = [
            f"stores.0.path={root / 'teacher_store'}",
            f"eval.store={root / 'teacher_store_heldout'}",
        ]
        if student == "bpe":
            base.append(f"student.transfer.tokenizer={root / 'bpe_tokenizer'}")
        if quick:
            base += study.quick.train + study.quick.students.get(student, [])
        factors = {m: [1.0] for m in plan.methods}
        swept = study.lr_sweep.get("students", list(study.students))
        for method in study.lr_sweep.get("methods", []) if student in swept else []:
            if method in factors:
                factors[method] += [float(f) for f in study.lr_sweep.get("factors", [])]
        lr = yaml.safe_load((REPO / plan.recipe).read_text())["optim"]["lr"]
        for method in plan.methods:
            for factor in factors[method][: study.quick.lr_factors if quick else None]:
                name = method if factor == 1.0 else f"{method}_lr{factor:.3g}"
                out = root / student / name
                overrides = [*base, *study.methods[method], f"output_dir={out}"]
                if factor != 1.0:
                    overrides.append(f"optim.lr={lr * factor!r}")
                runs.append(
                    {
                        "student": student,
                        "method": method,
                        "lr_factor": factor,
                        "lr": lr * factor,
                        "name": name,
                        "recipe": plan.recipe,
                        "overrides": overrides,
                        "output_dir": out,
                    }
                )
    return runs


def alm(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    logger.info("alm %s", " ".join(args))
    subprocess.run([sys.executable, "-m", "alm.cli", *args], cwd=REPO, env=env, check=True)


def metadata_corpus() -> list[str]:
    """The installed distributions' METADATA texts (package descriptions), sorted by name: the BPE's corpus."""
    texts = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        text = dist.read_text("METADATA") or ""
        if name and text.strip():
            texts[name.lower()] = text
    return [texts[k] for k in sorted(texts)]


def train_bpe(out: Path, vocab_size: int, teacher_tokenizer: Any) -> None:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on `metadata_corpus()`, with the teacher's special tokens
    first (same strings, same bos/eos/pad roles) so the transferred student keeps them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alm.train.student import special_token_strings

    specials = special_token_strings(teacher_tokenizer)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(metadata_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=teacher_tokenizer.bos_token,
        eos_token=teacher_tokenizer.eos_token,
        pad_token=teacher_tokenizer.pad_token,
    )
    if getattr(teacher_tokenizer, "chat_template", None):
        hf.chat_template = teacher_tokenizer.chat_template
    tmp = out.with_name(out.name + ".tmp")
    hf.save_pretrained(tmp)
    tmp.rename(out)


def save_initial_student(recipe: str, overrides: list[str], out: Path) -> None:
    """The student every run of this recipe starts from (same transfer, same seed), saved for evaluation."""
    from alm.config.load import load_yaml_model
    from alm.config.train import TrainRecipe
    from alm.store import open_store
    from alm.train.student import load_student, save_student

    cfg = load_yaml_model(TrainRecipe, REPO / recipe, overrides)
    teacher_model = open_store(cfg.stores[0].path).manifest.teacher_model
    student = load_student(cfg.student, teacher_model=teacher_model, seed=cfg.seed)
    tmp = out.with_name(out.name + ".tmp")
    save_student(student.model, student.tokenizer, tmp)
    tmp.rename(out)


def eval_texts(eval_set: EvalSet, quick: Quick | None) -> list[Any]:
    from alm.eval import load_eval_texts

    limit = quick.eval_limit if quick else eval_set.limit
    max_bytes = quick.eval_max_bytes if quick else eval_set.max_bytes
    data = eval_set.data if Path(eval_set.data).suffix == "" else str(REPO / eval_set.data)
    texts = load_eval_texts(data, limit=limit, max_bytes=max_bytes)
    if eval_set.pieces_per_document is None:
        return texts
    kept, seen = [], {}
    for text in texts:
        doc = text.text_id.split("@")[0]
        seen[doc] = seen.get(doc, 0) + 1
        if seen[doc] <= eval_set.pieces_per_document:
            kept.append(text)
    return kept


def evaluate_all(
    models: dict[str, Path | str], sets: dict[str, list[Any]], cache: Path
) -> dict[str, Any]:
    """Bits per byte of every model on every eval set (cached per model in `cache`, so reruns skip them)."""
    from alm.eval import score_texts
    from alm.eval.models import load_hf_model

    results: dict[str, Any] = {}
    cache.mkdir(parents=True, exist_ok=True)
    for key, model in models.items():
        path = cache / f"{key.replace('/', '__')}.json"
        if path.is_file():
            results[key] = json.loads(path.read_text())
            continue
        scorer = load_hf_model(str(model))
        row = {"model": str(model)}
        for set_name, texts in sets.items():
            scores = score_texts(scorer, texts, progress=True)
            row[set_name] = {
                "bits_per_byte": scores.bits_per_byte,
                "num_bytes": int(scores.num_bytes.sum()),
                "num_tokens": int(scores.num_tokens.sum()),
            }
        path.write_text(json.dumps(row, indent=2))
        results[key] = row
        del scorer
    return results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def training_figures(run_dir: Path) -> dict[str, Any]:
    """Diagnostics from a run's metrics: final loss, mean gradient norm, mean ALM groups per step."""
    from alm.train.log import read_metrics

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]

    def numbers(key: str) -> list[float]:
        return [float(r[key]) for r in train if isinstance(r.get(key), int | float)]

    evals = [r for r in records if "eval/student_bpb" in r]
    group_keys = [k for k in (train[0] if train else {}) if "group" in k]
    return {
        "final_loss": numbers("loss")[-1] if numbers("loss") else None,
        "mean_grad_norm": _mean(numbers("grad_norm")),
        "mean_alm_groups_per_step": _mean(numbers(group_keys[0])) if group_keys else None,
        "heldout_store_bpb": [(r["step"], r["eval/student_bpb"]) for r in evals],
        "heldout_store_teacher_bpb": evals[-1].get("eval/teacher_bpb") if evals else None,
    }


def summarise(
    study: Study, runs: list[dict[str, Any]], scores: dict[str, Any], root: Path
) -> dict[str, Any]:
    sets = list(study.eval)
    out: dict[str, Any] = {"teacher": scores["teacher"], "students": {}}
    for student in study.students:
        init = scores[f"{student}/init"]
        rows = []
        for run in (r for r in runs if r["student"] == student):
            final = scores.get(f"{student}/{run['name']}")
            if final is None:
                continue
            row = {k: run[k] for k in ("name", "method", "lr_factor", "lr")}
            for s in sets:
                teacher, first, last = (
                    scores["teacher"][s]["bits_per_byte"],
                    init[s]["bits_per_byte"],
                    final[s]["bits_per_byte"],
                )
                row[s] = {
                    "bits_per_byte": last,
                    "gap_closed": (first - last) / (first - teacher) if first > teacher else None,
                }
            row["training"] = training_figures(run["output_dir"])
            rows.append(row)
        out["students"][student] = {"init": init, "runs": rows}
    return out


def markdown(
    summary: dict[str, Any], study: Study, quick: bool, elapsed_s: float, study_file: str
) -> str:
    sets = list(study.eval)
    lines = [
        "# Reproduction: ALM vs SFT on SmolLM2-135M-Instruct (issue 14)",
        "",
        f"Generated by `scripts/reproduce.sh --study {study_file}`"
        + (" in **--quick** mode (a smoke run: the numbers mean nothing)" if quick else "")
        + f"; {elapsed_s / 60:.1f} minutes. Bits per byte from `alm eval` (docs/evaluation.md); "
        "gap closed = (initial − final) / (initial − teacher).",
        "",
    ]
    teacher = summary["teacher"]
    for student, data in summary["students"].items():
        lines += [f"## {student} student", "", f"![held-out bits per byte]({student}.png)", ""]
        header = ["run", "lr"]
        for s in sets:
            header += [f"{s} bpb", f"{s} gap closed"]
        header += ["final loss", "mean grad norm"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines.append(
            "| teacher | – | "
            + " | ".join(f"{teacher[s]['bits_per_byte']:.4f} | –" for s in sets)
            + " | – | – |"
        )
        lines.append(
            "| initial | – | "
            + " | ".join(f"{data['init'][s]['bits_per_byte']:.4f} | 0%" for s in sets)
            + " | – | – |"
        )
        for row in data["runs"]:
            cells = [row["name"], f"{row['lr']:.3g}"]
            for s in sets:
                closed = row[s]["gap_closed"]
                cells += [
                    f"{row[s]['bits_per_byte']:.4f}",
                    f"{closed:.1%}" if closed is not None else "–",
                ]
            t = row["training"]
            cells += [
                f"{t['final_loss']:.4f}" if t["final_loss"] is not None else "–",
                f"{t['mean_grad_norm']:.3g}" if t["mean_grad_norm"] is not None else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", default=str(REPO / "stages" / "repro_study.yaml"))
    parser.add_argument("--root", help="Working folder (default: the study's root).")
    parser.add_argument("--docs", help="Results folder (default: the study's docs).")
    parser.add_argument("--threads", type=int, help="Torch threads per run (default: the study's).")
    parser.add_argument(
        "--quick", action="store_true", help="The study's quick settings (a smoke run)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    study = load_study(args.study)
    study_path = Path(args.study).resolve()
    study_file = str(
        study_path.relative_to(REPO) if study_path.is_relative_to(REPO) else study_path
    )
    root = Path(args.root or REPO / study.root).resolve()
    docs = Path(args.docs or REPO / study.docs).resolve()
    threads = args.threads or study.threads
    quick = study.quick if args.quick else None
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)

    for name, recipe in study.precompute.items():
        store = root / ("teacher_store" if name == "train" else "teacher_store_heldout")
        extra = (quick.precompute if name == "train" else quick.precompute_heldout) if quick else []
        if (store / "alm-store.json").is_file():
            from alm.store import open_store

            # checked on opening; a finished store of an older (still readable) format is kept
            if open_store(store).is_finished:
                logger.info("store %s is finished: kept", store)
                continue
        sets = [a for o in [f"output={store}", *extra] for a in ("--set", o)]
        alm("precompute", str(REPO / recipe), *sets, threads=threads)

    from alm.store import open_store
    from alm.teacher.default import resolve_teacher_path
    from alm.train.student import load_tokenizer

    teacher_model = open_store(root / "teacher_store").manifest.teacher_model
    bpe_dir = root / "bpe_tokenizer"
    if not (bpe_dir / "tokenizer.json").is_file():
        vocab_size = quick.bpe_vocab_size if quick else study.bpe_tokenizer["vocab_size"]
        train_bpe(bpe_dir, vocab_size, load_tokenizer(resolve_teacher_path(teacher_model)))

    runs = run_plan(study, root, quick is not None)
    for student, plan in study.students.items():
        init_dir = root / student / "init"
        if not (init_dir / "config.json").is_file():
            first = next(r for r in runs if r["student"] == student)
            save_initial_student(plan.recipe, first["overrides"], init_dir)

    from alm.config.train import LossConfig

    for run in runs:
        if (
            any(o.startswith("loss.debias") for o in run["overrides"])
            and "debias" not in LossConfig.model_fields
        ):
            logger.warning(
                "skipping %s/%s: this alm has no loss.debias yet (issue 8)",
                run["student"],
                run["name"],
            )
            continue
        if (run["output_dir"] / "student" / "config.json").is_file():
            continue
        sets = [a for o in run["overrides"] for a in ("--set", o)]
        resume = ["--resume"] if (run["output_dir"] / "alm-run.json").is_file() else []
        alm("train", str(REPO / run["recipe"]), *sets, *resume, threads=threads)

    eval_sets = {name: eval_texts(s, quick) for name, s in study.eval.items()}
    models: dict[str, Path | str] = {"teacher": teacher_model}
    for student in study.students:
        models[f"{student}/init"] = root / student / "init"
    for run in runs:
        if (run["output_dir"] / "student" / "config.json").is_file():
            models[f"{run['student']}/{run['name']}"] = run["output_dir"] / "student"
    scores = evaluate_all(models, eval_sets, root / "eval")

    from alm.report import write_report

    docs.mkdir(parents=True, exist_ok=True)
    for student in study.students:
        dirs = [
            r["output_dir"]
            for r in runs
            if r["student"] == student
            and r["lr_factor"] == 1.0
            and (r["output_dir"] / "metrics.jsonl").is_file()
        ]
        if dirs:
            write_report(
                dirs,
                root / "report" / student,
                title=f"{student} student",
                names=[d.name for d in dirs],
            )
            png = root / "report" / student / "report.png"
            if png.is_file():
                (docs / f"{student}.png").write_bytes(png.read_bytes())
    summary = summarise(study, runs, scores, root)
    elapsed = time.perf_counter() - started
    summary["settings"] = {"quick": quick is not None, "threads": threads, "elapsed_s": elapsed}
    (docs / "reproduction.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (docs / "reproduction.md").write_text(
        markdown(summary, study, quick is not None, elapsed, study_file)
    )
    logger.info("results: %s", docs / "reproduction.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
