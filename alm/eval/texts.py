"""Held-out text for `alm eval`: documents from a data spec or a plain `.txt` / `.jsonl` file, cut into pieces.

Every model in one evaluation scores exactly the same bytes, so the pieces are made here, from the bytes alone,
before any tokenizer sees them (docs/evaluation.md "Which bytes are scored"):

- a `.txt` file is one document; a `.jsonl` file has one document per line, a JSON string or an object with a
  `text` field; anything else is a data spec (`alm.data.specs.load_data_spec`: a YAML path or a name in
  `data_specs/`), read in its `split`, each document's content text (the concatenation of its text segments;
  chat documents are scored as their message texts, without a template);
- a document longer than `max_bytes` is cut into consecutive pieces of at most `max_bytes` bytes, each ending at
  the last newline of its second half when there is one, else at the last complete UTF-8 character, so every byte
  is scored exactly once and no piece starts inside a character;
- pieces that are empty or only whitespace are dropped.

Imports `alm.data.specs` and `alm.errors` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alm.data.specs import iter_documents, load_data_spec
from alm.errors import DataError
from alm.vocab import complete_utf8_prefix


@dataclass(frozen=True)
class EvalText:
    """One scored piece of held-out text.

    Attributes:
        text_id: `<doc_id>` or `<doc_id>@<piece start byte>` when the document was cut.
        text: the piece's UTF-8 bytes (never empty, never only whitespace).
    """

    text_id: str
    text: bytes


def split_text(text: bytes, max_bytes: int) -> list[tuple[int, bytes]]:
    """Cut `text` into consecutive pieces of at most `max_bytes` bytes: `(start_byte, piece)` pairs.

    A piece ends after the last newline in its second half when it has one, otherwise at the last complete UTF-8
    character; the pieces concatenate to `text`.

    Raises:
        DataError: `max_bytes` < 4 (a UTF-8 character needs up to 4 bytes) or `text` is not valid UTF-8.
    """
    if max_bytes < 4:
        raise DataError(f"max_bytes must be at least 4 (one UTF-8 character), got {max_bytes}")
    pieces = []
    start = 0
    while start < len(text):
        end = min(start + max_bytes, len(text))
        if end < len(text):
            newline = text.rfind(b"\n", start + max_bytes // 2, end)
            end = newline + 1 if newline >= 0 else start + complete_utf8_prefix(text[start:end])
        pieces.append((start, text[start:end]))
        start = end
    return pieces


def _jsonl_texts(path: Path) -> list[tuple[str, bytes]]:
    out = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{line_number}: expected a JSON string or an object with a string 'text' field; use a "
                "data spec (data_specs/*.yaml) for other layouts"
            )
        out.append((f"{path.name}:{line_number}", text.encode("utf-8")))
    return out


def load_eval_texts(
    source: str | Path,
    *,
    split: str | None = None,
    limit: int | None = None,
    max_bytes: int = 4096,
) -> list[EvalText]:
    """The pieces of held-out text that every model scores.

    Args:
        source: a `.txt` or `.jsonl` file, or a data spec (YAML path or the name of a spec in `data_specs/`).
        split: the data spec's split (`train`, `heldout`, `all`; default: the spec's own). Ignored for files.
        limit: at most this many documents (before cutting).
        max_bytes: longest piece in bytes (see the module docstring).

    Raises:
        DataError: a missing or unreadable file, invalid UTF-8, no text at all.
        ConfigError: an invalid data spec.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise DataError(f"--data {source}: no such file")
        try:
            documents = (
                [(path.name, path.read_bytes().decode("utf-8").encode("utf-8"))]
                if suffix == ".txt"
                else _jsonl_texts(path)
            )
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}: not valid UTF-8 at byte {exc.start}; alm evaluates UTF-8 text"
            ) from None
        documents = documents[:limit] if limit is not None else documents
    else:
        spec = load_data_spec(source)
        documents = []
        for document in iter_documents(spec, split):
            if limit is not None and len(documents) >= limit:
                break
            documents.append((document.doc_id, document.content_text))
    texts = []
    for doc_id, text in documents:
        pieces = split_text(text, max_bytes)
        for start, piece in pieces:
            if piece.strip():
                texts.append(EvalText(doc_id if len(pieces) == 1 else f"{doc_id}@{start}", piece))
    if not texts:
        raise DataError(f"--data {source}: no non-empty text to evaluate")
    return texts
