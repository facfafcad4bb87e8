"""The `alm` command line: parse arguments, call a `run_*` function, print user errors.

    alm precompute stages/demo_precompute.yaml [--set key=value ...] [--shard i/N] [--overwrite] [--students TOK]
    alm train stages/demo_train.yaml [--set key=value ...] [--dry-run] [--resume]
    alm inspect STORE [--compare OTHER | --student TOKENIZER]
    alm align STORE (--student TOKENIZER [--max-length N] | --recipe TRAIN_RECIPE) [--overwrite]
    alm verify STORE [--deep]
    alm store finalize STORE
    alm store push STORE URL
    alm store pull URL DIR
    alm eval MODEL... --data SOURCE [--teacher-store STORE] [--json OUT] [--ensemble]
    alm report RUN_DIR... [--out DIR]

Every `AlmError` is printed as one message and exits with code 2 (a training run stopped by Ctrl-C or SIGTERM:
"interrupted at step N ...; rerun with --resume", exit code 130 or 143); any other exception is a bug and keeps
its traceback. `ALM_LOG_LEVEL` (DEBUG, INFO (default), WARNING, ERROR) sets how much the `alm` loggers print. This is the only module that imports typer and the only one that prints.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alm.errors import AlmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    help="Offline cross-tokenizer distillation with Approximate Likelihood Matching (ALM).",
)
store_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Maintain teacher stores.",
)
app.add_typer(store_app, name="store")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: --set key.sub=value (repeatable)."),
]


def _setup_logging() -> None:
    level = os.environ.get("ALM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_version(value: bool) -> None:
    if value:
        from alm import __version__

        print(f"alm {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Offline cross-tokenizer distillation with Approximate Likelihood Matching (ALM)."""


@app.command()
def precompute(
    recipe: Annotated[
        Path, typer.Argument(help="Precompute recipe (YAML), e.g. stages/demo_precompute.yaml.")
    ],
    set_: SetOption = None,
    shard: Annotated[
        str, typer.Option(help="Write part i of N (0-based), e.g. --shard 0/4.")
    ] = "0/1",
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing teacher store made with different settings.")
    ] = False,
    students: Annotated[
        list[str] | None,
        typer.Option(
            "--students",
            help="Once the store is finished, also write its alignment cache for each student tokenizer "
            "(as `alm align STORE --student TOKENIZER`; repeatable).",
        ),
    ] = None,
) -> None:
    """Run the teacher once over a dataset and write its targets into a teacher store."""
    from alm.precompute import run_precompute

    out = run_precompute(recipe, overrides=set_ or [], shard=shard, overwrite=overwrite)
    print(out)
    if students:
        from alm.config.precompute import load_precompute_recipe
        from alm.store.reader import open_store
        from alm.train.alignments import run_align

        store = load_precompute_recipe(recipe, set_ or []).output
        if not open_store(store, allow_unfinished=True).is_finished:
            print(
                f"alignment caches not written yet: {store} is unfinished (other workers are still running); "
                f"run `alm align {store} --student TOKENIZER` once it is finished"
            )
            return
        for student in students:
            print(run_align(store, student=student))


@app.command()
def train(
    recipe: Annotated[
        Path, typer.Argument(help="Training recipe (YAML), e.g. stages/demo_train.yaml.")
    ],
    set_: SetOption = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="Validate the recipe and the store, print the resolved config, exit."),
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest checkpoint in the output folder.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a finished run in the output folder.")
    ] = False,
) -> None:
    """Train a student from a teacher store."""
    from alm.train.command import run_train_cli

    out = run_train_cli(
        recipe, overrides=set_ or [], dry_run=dry_run, resume=resume, overwrite=overwrite
    )
    print(out)


@app.command()
def inspect(
    store: Annotated[str, typer.Argument(help="Teacher store folder or URL.")],
    compare: Annotated[
        str | None, typer.Option(help="A second store on the same data: report their differences.")
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="A student tokenizer (id, folder or `bytes`): report chunk statistics against it."
        ),
    ] = None,
) -> None:
    """Summarise a teacher store (sizes, fingerprints, teacher bits per byte, boundary-mass statistics)."""
    from alm.store.inspect import compare_stores, inspect_store

    if student is not None:
        from alm.errors import ConfigError
        from alm.train.alignments import inspect_student_text

        if compare:
            raise ConfigError("--student and --compare are separate reports; give one of them")
        print(inspect_student_text(store, student))
        return
    print(compare_stores(store, compare) if compare else inspect_store(store))


@app.command()
def align(
    store: Annotated[str, typer.Argument(help="A finished teacher store (folder or URL).")],
    student: Annotated[
        str | None,
        typer.Option(
            help="Student tokenizer: HF id, folder, or `bytes` (byte tokenizer with the teacher's specials)."
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(help="A training recipe: take the student and loss settings from it instead."),
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Student sequence length with --student (default 512).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace this student's cache built with other settings.")
    ] = False,
) -> None:
    """Align a store against a student tokenizer once and cache it in STORE/alignments/ for `alm train`."""
    from alm.train.alignments import run_align

    print(
        run_align(store, student=student, recipe=recipe, max_length=max_length, overwrite=overwrite)
    )


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Teacher store folder or URL.")],
    deep: Annotated[
        bool, typer.Option(help="Also re-score a sample of sequences with the teacher.")
    ] = False,
) -> None:
    """Check every file, checksum and value of a teacher store; exit 2 naming the first problem."""
    from alm.verify import run_verify

    print(run_verify(store, deep=deep))


@store_app.command("finalize")
def store_finalize(
    store: Annotated[str, typer.Argument(help="Teacher store folder or URL.")],
) -> None:
    """Check every shard of a store (counts, checksums, fingerprints) and write its manifest."""
    from alm.store.finalize import finalize_store

    print(finalize_store(store))


@store_app.command("push")
def store_push(
    store: Annotated[str, typer.Argument(help="A finished teacher store (folder or URL).")],
    url: Annotated[
        str,
        typer.Argument(
            help="Destination fsspec URL: s3://..., gs://..., hf://datasets/ORG/NAME, a folder."
        ),
    ],
) -> None:
    """Copy a finished store to a URL: resumable, every file verified after upload, manifest last."""
    from alm.store.transfer import push_store

    print(push_store(store, url).summary("pushed to"))


@store_app.command("pull")
def store_pull(
    url: Annotated[str, typer.Argument(help="Where the store was pushed (fsspec URL or folder).")],
    folder: Annotated[str, typer.Argument(metavar="DIR", help="Local destination folder.")],
) -> None:
    """Copy a pushed store into a local folder: resumable, checksums verified, manifest last."""
    from alm.store.transfer import pull_store

    print(pull_store(url, folder).summary(f"pulled {folder} from"))


@app.command("eval")
def eval_(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model folders, HF ids, builtin:smollm2-135m-instruct, or ensemble recipes (.yaml)."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(help="Held-out text: a data spec (YAML or name), a .txt or a .jsonl file."),
    ],
    teacher_store: Annotated[
        str | None,
        typer.Option(help="A teacher store: also report chunk agreement and binarised KL with it."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the results as JSON.")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Data spec split: train, heldout or all (default: the spec's)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many documents.")] = None,
    max_bytes: Annotated[
        int, typer.Option(help="Cut documents into pieces of at most this many bytes.")
    ] = 4096,
    ensemble: Annotated[
        bool,
        typer.Option(help="Also score the ensemble of the MODELs (they must share a tokenizer)."),
    ] = False,
    combine: Annotated[
        str, typer.Option(help="Ensemble average: probs (default) or logprobs.")
    ] = "probs",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Held-out bits per byte of models with any tokenizers, on exactly the same text bytes."""
    from alm.errors import ConfigError
    from alm.eval.run import run_eval_cli

    if combine not in ("probs", "logprobs"):
        raise ConfigError(f"--combine {combine!r}: use probs or logprobs")
    print(
        run_eval_cli(
            models,
            data,
            teacher_store=teacher_store,
            json_out=json_out,
            split=split,
            limit=limit,
            max_bytes=max_bytes,
            ensemble=ensemble,
            combine="probs" if combine == "probs" else "logprobs",
            device=device,
        )
    )


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders of `alm train` (output_dir).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.png and report.md.")] = Path(
        "report"
    ),
    title: Annotated[str | None, typer.Option(help="Title of the plot and the table.")] = None,
) -> None:
    """Plot losses and held-out metrics of one or more runs against the step, and tabulate them."""
    from alm.report import write_report

    print(write_report(run_dirs, out, title=title))


def user_message(err: AlmError) -> str:
    """The error's own message; an error raised in a DataLoader worker arrives wrapped in the worker's traceback
    (`Caught StoreError in DataLoader worker process 0. Original Traceback ...`), which is unwrapped here."""
    text = str(err)
    marker = f"{type(err).__module__}.{type(err).__name__}: "
    if text.startswith("Caught ") and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip()


def main() -> None:
    _setup_logging()
    try:
        app()
    except AlmError as err:
        exit_code = getattr(
            err, "exit_code", 2
        )  # a run stopped by a signal: 128 + the signal number
        prefix = "" if exit_code != 2 else "error: "
        print(f"{prefix}{user_message(err)}", file=sys.stderr)
        sys.exit(exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
