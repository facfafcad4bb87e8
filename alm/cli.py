"""The `alm` command line: parse arguments, call a `run_*` function, print user errors.

    alm precompute stages/demo_precompute.yaml [--set key=value ...] [--shard i/N] [--overwrite]
    alm train stages/demo_train.yaml [--set key=value ...] [--dry-run] [--resume]
    alm inspect STORE [--compare OTHER]
    alm store finalize STORE

Every `AlmError` is printed as one message and exits with code 2; any other exception is a bug and keeps its
traceback. This is the only module that imports typer and the only one that prints.
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
    pretty_exceptions_enable=False,
    help="Offline cross-tokenizer distillation with Approximate Likelihood Matching (ALM).",
)
store_app = typer.Typer(no_args_is_help=True, help="Maintain teacher stores.")
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
) -> None:
    """Run the teacher once over a dataset and write its targets into a teacher store."""
    from alm.precompute import run_precompute

    out = run_precompute(recipe, overrides=set_ or [], shard=shard, overwrite=overwrite)
    print(out)


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
) -> None:
    """Summarise a teacher store (sizes, fingerprints, teacher bits per byte, boundary-mass statistics)."""
    from alm.store.inspect import compare_stores, inspect_store

    print(compare_stores(store, compare) if compare else inspect_store(store))


@store_app.command("finalize")
def store_finalize(
    store: Annotated[str, typer.Argument(help="Teacher store folder or URL.")],
) -> None:
    """Check every shard of a store (counts, checksums, fingerprints) and write its manifest."""
    from alm.store.finalize import finalize_store

    print(finalize_store(store))


def main() -> None:
    _setup_logging()
    try:
        app()
    except AlmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
