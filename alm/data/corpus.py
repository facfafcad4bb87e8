"""The built-in offline corpus: docstrings and comments of the Python standard library.

Every machine that runs `alm` has the standard library's source files, so the demo and the tests can use real
English (and code-flavoured) text without any download. Files are *read* and parsed with `ast` (docstrings) and
`tokenize` (comments); no module is ever imported, because some have side effects.

Owns: locating the stdlib sources, extracting text blocks, the deterministic train / held-out split (by a hash of
the file's path relative to the stdlib root, so the split does not depend on the order of files or on caps), and
the size cap. Imports nothing from `alm` except `alm.errors`. Used by `alm.data.specs` (source kind `stdlib`) and by
`tests/factories.py`.
"""

from __future__ import annotations

import ast
import hashlib
import io
import logging
import random
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alm.errors import DataError

logger = logging.getLogger(__name__)

Split = Literal["train", "heldout", "all"]

# Folders under the stdlib root that are not the standard library's own prose.
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "lib2to3", "idlelib", "turtledemo"}
)


@dataclass(frozen=True)
class CorpusBlock:
    """One text block: a docstring or a run of consecutive comment lines.

    Attributes:
        path: file path relative to the stdlib root, with `/` separators.
        line: 1-based line number where the block starts.
        kind: `docstring` or `comment`.
        text: the block's text (docstrings cleaned with `inspect.cleandoc` rules; comments without `# `).
    """

    path: str
    line: int
    kind: str
    text: str


def stdlib_root() -> Path:
    """Folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Sorted relative paths (`/`-separated) of the stdlib's `.py` files, tests included, vendored trees excluded.

    Raises:
        DataError: no Python source files were found (a stripped interpreter without sources).
    """
    root = stdlib_root() if root is None else root
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        files.append(rel.as_posix())
    if not files:
        raise DataError(
            f"no Python source files under {root}: the built-in corpus needs the standard library's .py sources "
            "(install the python3 source package, or use a JSONL/text data spec instead)"
        )
    files.sort()
    return files


def heldout_fraction_of(path: str) -> float:
    """A number in [0, 1) fixed by the file's relative path: files below the held-out fraction are held out."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_split(path: str, split: Split, heldout_fraction: float) -> bool:
    """Whether the file at relative `path` belongs to `split`."""
    if split == "all":
        return True
    is_heldout = heldout_fraction_of(path) < heldout_fraction
    return is_heldout if split == "heldout" else not is_heldout


def extract_blocks(source: str, path: str) -> list[CorpusBlock]:
    """Docstrings (via `ast`) and comment runs (via `tokenize`) of one source file, in line order.

    A file that does not parse (a stdlib file written for another Python version) yields no blocks.
    """
    blocks: list[CorpusBlock] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and node.body:
                blocks.append(CorpusBlock(path, node.body[0].lineno, "docstring", doc))
    run: list[str] = []
    run_start = 0
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            text = tok.string[1:]
            text = text[1:] if text.startswith(" ") else text
            if tok.line[
                : tok.start[1]
            ].strip():  # a trailing comment after code is a block of its own
                if run:
                    blocks.append(CorpusBlock(path, run_start, "comment", "\n".join(run)))
                    run = []
                blocks.append(CorpusBlock(path, line, "comment", text))
                last_line = -2
                continue
            if line != last_line + 1 and run:
                blocks.append(CorpusBlock(path, run_start, "comment", "\n".join(run)))
                run = []
            if not run:
                run_start = line
            run.append(text)
            last_line = line
    except (tokenize.TokenError, SyntaxError):
        pass
    if run:
        blocks.append(CorpusBlock(path, run_start, "comment", "\n".join(run)))
    blocks.sort(key=lambda b: (b.line, b.kind))
    return blocks


def read_file_blocks(root: Path, path: str) -> list[CorpusBlock]:
    """Blocks of one stdlib file; files that are not UTF-8 yield no blocks."""
    try:
        source = (root / path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return extract_blocks(source, path)


def iter_corpus_blocks(
    split: Split = "train",
    *,
    heldout_fraction: float = 0.05,
    min_chars: int = 64,
    max_bytes: int | None = 4_000_000,
    max_documents: int | None = None,
    seed: int | None = None,
    root: Path | None = None,
) -> Iterator[CorpusBlock]:
    """Yield the corpus blocks of `split`, deterministically, until a cap is reached.

    Args:
        split: `train`, `heldout` or `all`; the split is by a hash of the file's relative path.
        heldout_fraction: fraction of files (by path hash) in the held-out split.
        min_chars: blocks with fewer characters (after stripping) are skipped.
        max_bytes: stop once the UTF-8 bytes yielded reach this cap (None: no cap).
        max_documents: stop after this many blocks (None: no cap).
        seed: None visits files in sorted order; an int visits them in a seeded random order.
        root: the stdlib root (default: the running interpreter's).

    Raises:
        DataError: no stdlib sources were found.
    """
    root = stdlib_root() if root is None else root
    files = [p for p in stdlib_files(root) if in_split(p, split, heldout_fraction)]
    if seed is not None:
        random.Random(seed).shuffle(files)
    num_bytes = 0
    num_docs = 0
    for path in files:
        for block in read_file_blocks(root, path):
            if len(block.text.strip()) < min_chars:
                continue
            yield block
            num_docs += 1
            num_bytes += len(block.text.encode("utf-8"))
            if (max_documents is not None and num_docs >= max_documents) or (
                max_bytes is not None and num_bytes >= max_bytes
            ):
                return
