"""`--overwrite` that never loses data: move the old store (or run) aside, delete only what alm wrote, and only
after the replacement is complete (`DESIGN.md` "Stores never lie", issue 9 item 4).

`move_aside(root, entries)` renames alm's entries of a folder (a store's plan, manifest, `shards/`, `vocab/`,
`alignments/`; a run's `student/`, `checkpoints/`, ...) into `root/.alm-replaced-<time>-<random>/` (a rename on the
same disk: instant, nothing deleted). When the new store is finished (`finalize_store`) or the new run has saved
its student, `remove_replaced(root, owned)` deletes from each aside folder exactly the files `owned` says alm
wrote, moves every other file (a user's notes, a model card) back to its old place (or leaves it in the aside
folder when that place is taken, with a warning), and removes the aside folder once it is empty.

Object stores (fsspec URLs) cannot rename a folder: there `move_aside_remote(location, rels)` moves only the files
alm wrote (each copied then deleted, by `fs.mv`) into `.alm-replaced-<time>-<random>/`, so a user's files never
move, and `remove_replaced_remote(location, owned)` deletes exactly the aside files `owned` says alm wrote once the
new store is finished.

Also `output_write_error`: a full disk while a run writes its outputs, as one message. Imports the standard
library, `alm.errors` and `alm.store._fs` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from alm.errors import StoreError
from alm.store._fs import Location
from alm.store.owned import files_under

logger = logging.getLogger(__name__)

REPLACED_PREFIX = ".alm-replaced-"


def move_aside(root: str | os.PathLike[str], entries: Iterable[str]) -> Path | None:
    """Rename the existing `entries` of `root` into a new aside folder; None when none exists."""
    root = Path(root)
    present = [name for name in entries if os.path.lexists(root / name)]
    if not present:
        return None
    aside = root / _aside_name()
    aside.mkdir()
    for name in present:
        os.rename(root / name, aside / name)
    logger.info("--overwrite: moved the previous %s aside to %s", ", ".join(present), aside)
    return aside


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    )


def remove_replaced(root: str | os.PathLike[str], owned: Callable[[Path], set[str]]) -> list[str]:
    """Delete alm's files from every aside folder of `root`; move the others back. Returns the kept files.

    Args:
        root: the store or run folder.
        owned: given an aside folder, the "/"-separated relative paths of the files alm wrote there.
    """
    root = Path(root)
    kept: list[str] = []
    for aside in sorted(root.glob(f"{REPLACED_PREFIX}*")):
        if not aside.is_dir():
            continue
        mine = owned(aside)
        for rel in _files(aside):
            path = aside / rel
            if rel in mine:
                path.unlink()
                continue
            target = root / rel
            if os.path.lexists(target):
                kept.append(str(path))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            logger.info("--overwrite: kept %s (not written by alm)", target)
        for dirpath, _, _ in sorted(os.walk(aside), key=lambda e: -len(e[0])):
            with contextlib.suppress(
                OSError
            ):  # not empty: a user's file stayed, its old place is taken
                os.rmdir(dirpath)
    if kept:
        logger.warning(
            "--overwrite: %d file(s) not written by alm could not go back (their place is taken): %s",
            len(kept),
            ", ".join(kept[:5]),
        )
    return kept


def _aside_name() -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{REPLACED_PREFIX}{stamp}-{uuid.uuid4().hex[:6]}"


def move_aside_remote(location: Location, rels: Iterable[str]) -> str | None:
    """Move the existing files `rels` (relative to the store root) of an object store into a new aside folder,
    one by one (copy, then delete); None when none exists. The store's other files stay where they are."""
    present = [rel for rel in sorted(rels) if location.exists(rel) and not location.isdir(rel)]
    if not present:
        return None
    aside = _aside_name()
    for rel in present:
        location.fs.mv(location.path(rel), location.path(aside, rel))
    logger.info(
        "--overwrite: moved the previous store's %d files aside to %s",
        len(present),
        location.path(aside),
    )
    return aside


def remove_replaced_remote(
    location: Location, owned: Callable[[Location, str], set[str]]
) -> list[str]:
    """Delete alm's files from every aside folder of an object store; keep (and name) any other. Returns the
    kept files.

    Args:
        location: the store.
        owned: given the store and an aside folder, the paths (relative to that folder) of the files alm wrote.
    """
    kept: list[str] = []
    for name in location.listdir():
        if not name.startswith(REPLACED_PREFIX) or not location.isdir(name):
            continue
        mine = owned(location, name)
        others = [rel for rel in files_under(location, name) if rel not in mine]
        for rel in sorted(mine & set(files_under(location, name))):
            location.fs.rm(location.path(name, rel))
        if others:
            kept += [location.path(name, rel) for rel in others]
        elif location.exists(name):
            location.remove(name)  # only empty prefixes are left
    if kept:
        logger.warning(
            "--overwrite: %d file(s) in the old store's aside folder were not written by alm and were kept: %s",
            len(kept),
            ", ".join(kept[:5]),
        )
    return kept


# What `alm train` writes in a run folder (alm.train.loop, checkpoint, log; student/ is `save_pretrained` of the
# model and tokenizer). A file of another name under these folders is a user's and is kept.
_RUN_FILES = ("alm-run.json", "config.yaml", "metrics.jsonl", "train.log", "metrics.png")
_STUDENT_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|"
    r"adapter_config|chat_template|preprocessor_config)\.json|merges\.txt|vocab\.txt|tokenizer\.model|"
    r"spiece\.model|chat_template\.jinja|(model|adapter_model)(-\d{5}-of-\d{5})?\.safetensors|"
    r"model\.safetensors\.index\.json|pytorch_model\.bin|README\.md"
)
_CHECKPOINT_FILE = re.compile(r"checkpoints/(\.tmp-)?step-\d{8}/state\.pt")


def written_run_files(root: Path) -> set[str]:
    """The files of a (replaced) training run folder that alm wrote, by relative path."""
    out = set()
    for rel in _files(root):
        if (
            rel in _RUN_FILES
            or rel.startswith(("tensorboard/", "wandb/"))
            or _CHECKPOINT_FILE.fullmatch(rel)
            or (
                rel.startswith("student/") and _STUDENT_FILE.fullmatch(rel.removeprefix("student/"))
            )
        ):
            out.add(rel)
    return out


_DISK_FULL_TEXT = (
    "no space left on device",
    "os error 28",
    "code: 28",
    "storagefull",
    "disk quota",
)


def output_write_error(err: BaseException, folder: str | os.PathLike[str]) -> StoreError | None:
    """A failed write of a run's outputs (checkpoint, student) as a user message, or None for other errors.

    A full disk shows up as `OSError` (errno 28), safetensors' `SafetensorError` ("No space left on device") or
    torch's `RuntimeError` (a stream error, recognised by the disk having under 1 MiB free); alm's half-written checkpoint temp folders are removed so the
    space comes back.
    """
    text = str(err).lower()
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        t in text for t in _DISK_FULL_TEXT
    )
    folder = Path(folder)
    if not full and isinstance(err, RuntimeError | OSError) and folder.exists():
        # torch.save reports a full disk as a bare stream error ("unexpected pos", "file write failed")
        full = shutil.disk_usage(folder).free < (1 << 20)
    if not full:
        return None
    for tmp in folder.glob("checkpoints/.tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return StoreError(
        f"writing the run's outputs in {folder} failed: no space left on the device ({free:,} bytes free now; "
        f"{type(err).__name__}). The checkpoints written before are intact and the half-written one was removed; "
        "free space (or set output_dir elsewhere) and rerun with --resume"
    )
