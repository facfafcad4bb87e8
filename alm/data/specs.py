"""Data specs -> documents: loading, file checks, deterministic iteration, fingerprints (DESIGN.md "Stage one").

Owns `load_data_spec` (YAML or mapping + `--set` overrides -> validated `DataSpec`, all schema problems in one
`ConfigError`, missing local files in one `DataError`), `iter_documents` (sources in order, rows in order, the
train / held-out split by a hash of the document id; empty documents skipped and counted), and the fingerprints
recorded in teacher stores (`data_spec_fingerprint`, `data_fingerprint`).

Documents are `alm.templates.Document`s: plain text becomes `[bos, text, eos]`, chat becomes
`[bos, header:<role>, text, eot, ..., eos]` with the loss region of the source (ALM_SPEC §3). Text is kept as
UTF-8 bytes; invalid UTF-8 in a file is a `DataError` naming the file and the byte offset.

Imports `alm.config`, `alm.templates`, `alm.data.corpus`, `alm.errors`; `datasets` and `pyarrow.parquet` lazily.
Hub datasets are only contacted by `iter_documents`, never by validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alm.config.data_spec import (
    DataSpec,
    HfDiskSource,
    HfHubSource,
    JsonlSource,
    ParquetSource,
    StdlibSource,
    TextSource,
)
from alm.config.load import apply_overrides, parse_overrides, read_yaml, validate_model
from alm.data import corpus
from alm.errors import ConfigError, DataError
from alm.templates import Document, chat_document, plain_document

logger = logging.getLogger(__name__)

DATA_SPECS_DIR = Path(__file__).resolve().parents[2] / "data_specs"
_HASH_CAP_BYTES = (
    64 * 1024 * 1024
)  # identity of a large file: its size plus a hash of its first 64 MiB


@dataclass
class DocumentStats:
    """Counts from one pass of `iter_documents` (filled while iterating)."""

    num_documents: int = 0
    num_empty: int = 0
    num_other_split: int = 0
    num_invalid: int = 0
    per_source: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class InvalidRecord:
    """A record whose text has no exact bytes (a lone surrogate such as JSON `"\\ud800"`, or a line that is
    not UTF-8): refused by `iter_documents`, or skipped and counted with `skip_invalid`."""

    where: str
    reason: str


class _UnencodableError(Exception):
    """Internal: a string field with no UTF-8 bytes; becomes an `InvalidRecord`."""


def _base_dir(spec: DataSpec) -> Path | None:
    return Path(spec._base_dir) if spec._base_dir else None


def load_data_spec(
    path_or_name: str | Path | Mapping[str, Any] | DataSpec,
    overrides: list[str] | None = None,
    *,
    source: str | None = None,
    check_files: bool = True,
) -> DataSpec:
    """Load and validate a data spec.

    Args:
        path_or_name: a YAML path, the name of a spec shipped in `data_specs/` (e.g. `stdlib_docs`), a mapping
            (an inline spec), or an existing `DataSpec`.
        overrides: `--set key=value` strings applied before validation.
        source: label for messages when `path_or_name` is a mapping.
        check_files: check that local source files exist (no network is ever used).

    Raises:
        ConfigError: the spec cannot be read or is invalid (every problem listed at once).
        DataError: local source files are missing (all listed at once).
    """
    base_dir: Path | None = None
    if isinstance(path_or_name, DataSpec):
        spec = path_or_name
        base_dir = _base_dir(spec)
        label = source or spec.name
        if overrides:
            data = _apply_overrides(spec.model_dump(mode="json"), overrides)
            spec = validate_model(DataSpec, data, label)
    else:
        if isinstance(path_or_name, Mapping):
            data = dict(path_or_name)
            label = source or "inline data spec"
        else:
            path = _find_spec_file(path_or_name)
            data = read_yaml(path)
            label = str(path)
            base_dir = path.parent
        data = _apply_overrides(data, overrides)
        spec = validate_model(DataSpec, data, label)
    spec._base_dir = str(base_dir.resolve()) if base_dir is not None else None
    _check_source_names(spec, label)
    if check_files:
        missing = [
            f"  - sources[{i}] ({src.type}): {src.path}"  # type: ignore[union-attr]
            for i, src in enumerate(spec.sources)
            if hasattr(src, "path") and _resolve(spec, src.path) is None  # type: ignore[union-attr]
        ]
        if missing:
            where = base_dir or Path.cwd()
            raise DataError(
                f"{label}: {len(missing)} source path(s) not found (relative paths are looked up in {where} "
                "and the working directory):\n" + "\n".join(missing)
            )
    return spec


def _apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`alm.config.apply_overrides` of parsed `--set` strings (list indices work: `sources.0.max_bytes=1000`)."""
    return apply_overrides(data, parse_overrides(overrides))


def _find_spec_file(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    for candidate in (
        DATA_SPECS_DIR / path,
        DATA_SPECS_DIR / f"{path}.yaml",
        DATA_SPECS_DIR.parent / path,  # `data_specs/x.yaml` from another working directory
    ):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DATA_SPECS_DIR.glob("*.yaml")) if DATA_SPECS_DIR.is_dir() else []
    raise ConfigError(
        f"data spec {str(path_or_name)!r} not found: give a YAML path or one of the shipped specs {known}"
    )


def _check_source_names(spec: DataSpec, label: str) -> None:
    names = [source_name(spec, i) for i in range(len(spec.sources))]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"{label}: source names {dupes} are used twice; give each source a distinct `name`"
        )


def source_name(spec: DataSpec, index: int) -> str:
    """The `source` recorded for documents of `spec.sources[index]`."""
    src = spec.sources[index]
    if src.name:
        return src.name
    match src:
        case StdlibSource():
            return "stdlib"
        case HfHubSource():
            return src.dataset + (f"/{src.config}" if src.config else "")
        case _:
            return Path(src.path).name  # type: ignore[union-attr]


def _resolve(spec: DataSpec, path: str) -> Path | None:
    candidates = [Path(path)]
    base_dir = _base_dir(spec)
    if not Path(path).is_absolute() and base_dir is not None:
        candidates.insert(0, base_dir / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return None


def _resolve_or_raise(spec: DataSpec, path: str) -> Path:
    resolved = _resolve(spec, path)
    if resolved is None:
        raise DataError(
            f"data spec {spec.name!r}: source path {path!r} not found (looked in "
            f"{_base_dir(spec) or '.'} and the working directory)"
        )
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# Splits and documents


def heldout_fraction_of(doc_id: str) -> float:
    """A number in [0, 1) fixed by the document id (same hash as the stdlib corpus uses for file paths)."""
    return corpus.heldout_fraction_of(doc_id)


def _in_split(doc_id: str, split: str, fraction: float) -> bool:
    if split == "all":
        return True
    heldout = fraction > 0 and heldout_fraction_of(doc_id) < fraction
    return heldout if split == "heldout" else not heldout


def _utf8(raw: bytes, where: str, base_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        raise DataError(
            f"{where}: invalid UTF-8 at byte offset {offset} ({raw[exc.start : exc.start + 4]!r}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from the spec"
        ) from None


def _as_text(value: Any, where: str, field_name: str) -> bytes:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field_name!r} should be a string, got {type(value).__name__}; set the "
            "source's text_field (kind text) or chat fields (kind chat) to the right column"
        )
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = value[exc.start]
        raise _UnencodableError(
            f"field {field_name!r} holds a lone surrogate U+{ord(char):04X} at character {exc.start} "
            "(not Unicode text, e.g. a JSON escape such as \\ud800 without its pair): it has no exact bytes"
        ) from None


def _record_document(
    src: Any, record: Any, doc_id: str, name: str, row: int, where: str
) -> Document | InvalidRecord:
    try:
        return _record_document_strict(src, record, doc_id, name, row, where)
    except _UnencodableError as err:
        return InvalidRecord(where, str(err))


def _record_document_strict(
    src: Any, record: Any, doc_id: str, name: str, row: int, where: str
) -> Document:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object (mapping), got {type(record).__name__}")
    if (
        src.id_field is not None
    ):  # a stable id: the held-out split no longer moves when rows are reordered
        value = record.get(src.id_field)
        if value is None or isinstance(value, (dict, list)) or str(value) == "":
            raise DataError(
                f"{where}: no usable id in field {src.id_field!r} (got {value!r}); every record needs a "
                "non-empty string or number there (the source's id_field)"
            )
        doc_id = f"{name}:{value}"
    if src.kind == "text":
        if src.text_field not in record:
            raise DataError(
                f"{where}: no field {src.text_field!r} (fields: {sorted(record)}); set the source's text_field"
            )
        return plain_document(
            doc_id, name, row, _as_text(record[src.text_field], where, src.text_field)
        )
    chat = src.chat
    if chat.prompt_field is None and chat.messages_field not in record:
        raise DataError(
            f"{where}: no field {chat.messages_field!r} (fields: {sorted(record)}); set chat.messages_field"
        )
    if chat.prompt_field is not None and chat.response_field is not None:
        for name_ in (chat.prompt_field, chat.response_field):
            if name_ not in record:
                raise DataError(f"{where}: no field {name_!r} (fields: {sorted(record)})")
        prompt = _as_text(record[chat.prompt_field], where, chat.prompt_field)
        response = _as_text(record[chat.response_field], where, chat.response_field)
        return chat_document(
            doc_id, name, row, [("user", prompt), ("assistant", response)], loss=chat.loss
        )
    messages = record[chat.messages_field]
    if not isinstance(messages, list | tuple):
        raise DataError(f"{where}: {chat.messages_field!r} should be a list of messages")
    pairs = []
    for j, message in enumerate(messages):
        if not isinstance(message, Mapping) or chat.role_field not in message:
            raise DataError(
                f"{where}: message {j} has no {chat.role_field!r}; set chat.role_field / chat.content_field"
            )
        role = str(message[chat.role_field])
        role = chat.role_map.get(role, role)
        if role not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: message {j} has role {role!r}; map it with chat.role_map, e.g. {{{role}: user}}"
            )
        content = message.get(chat.content_field)
        pairs.append((role, _as_text(content, f"{where} message {j}", chat.content_field)))
    return chat_document(doc_id, name, row, pairs, loss=chat.loss)


def _iter_jsonl(spec: DataSpec, src: JsonlSource, name: str) -> Iterator[Document | InvalidRecord]:
    path = _resolve_or_raise(spec, src.path)
    offset = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line_offset = offset
            offset += len(raw)
            where = f"{path}:{line_no}"
            try:
                text = _utf8(raw, str(path), line_offset).strip()
            except DataError as err:
                yield InvalidRecord(where, str(err).removeprefix(f"{path}: "))
                continue
            if not text:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            yield _record_document(src, record, f"{name}:{line_no}", name, line_no - 1, where)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(path.rglob("*.parquet"))
    return [path]


def _iter_parquet(
    spec: DataSpec, src: ParquetSource, name: str
) -> Iterator[Document | InvalidRecord]:
    import pyarrow.parquet as pq

    row = 0
    for path in _parquet_files(_resolve_or_raise(spec, src.path)):
        try:
            file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a non-Parquet file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        for batch in file.iter_batches(batch_size=1024):
            for i, record in enumerate(batch.to_pylist()):
                where = f"{path} row {row}"
                yield _record_document(src, record, f"{name}:{row}", name, row, where)
                row += 1
                del i


def _text_files(path: Path, glob: str) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob(glob) if p.is_file())
    return [path]


def _iter_text(spec: DataSpec, src: TextSource, name: str) -> Iterator[Document]:
    root = _resolve_or_raise(spec, src.path)
    row = 0
    for path in _text_files(root, src.glob):
        raw = path.read_bytes()
        _utf8(raw, str(path))
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if src.unit == "file":
            yield plain_document(f"{name}:{rel}", name, row, raw)
            row += 1
            continue
        for line_no, line in enumerate(raw.split(b"\n"), start=1):
            if line.endswith(b"\r"):
                line = line[:-1]
            yield plain_document(f"{name}:{rel}:{line_no}", name, row, line)
            row += 1


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError:
        from alm.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "Hugging Face `datasets` is not installed; pip install 'alm[datasets]'"
        ) from None
    return datasets


def _iter_rows(dataset: Any, src: Any, name: str, where: str) -> Iterator[Document | InvalidRecord]:
    for row, record in enumerate(dataset):
        yield _record_document(src, record, f"{name}:{row}", name, row, f"{where} row {row}")


def _iter_hf_disk(
    spec: DataSpec, src: HfDiskSource, name: str
) -> Iterator[Document | InvalidRecord]:
    datasets = _datasets_module()
    path = _resolve_or_raise(spec, src.path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset folder written by save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = src.split or (
            "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        )
        if split not in loaded:
            raise DataError(f"{path}: split {src.split or 'train'!r} not found; it has {splits}")
        loaded = loaded[split]
    elif src.split is not None:
        raise DataError(
            f"{path}: holds a single Dataset, but the spec asks for split {src.split!r}"
        )
    yield from _iter_rows(loaded, src, name, str(path))


def _iter_hf_hub(spec: DataSpec, src: HfHubSource, name: str) -> Iterator[Document | InvalidRecord]:
    datasets = _datasets_module()
    try:
        loaded = datasets.load_dataset(
            src.dataset, src.config, split=src.split, revision=src.revision, streaming=src.streaming
        )
    except Exception as exc:  # network / hub errors come in many types
        raise DataError(
            f"data spec {spec.name!r}: hub dataset {src.dataset!r} could not be loaded ({type(exc).__name__}: "
            f"{exc}). Hub datasets need internet; offline, save it on a connected machine with "
            "`datasets.load_dataset(...).save_to_disk(DIR)` and use a source of type hf_disk"
        ) from None
    yield from _iter_rows(loaded, src, name, src.dataset)


def _iter_stdlib(spec: DataSpec, src: StdlibSource, name: str, split: str) -> Iterator[Document]:
    blocks = corpus.iter_corpus_blocks(
        split,  # type: ignore[arg-type]
        heldout_fraction=spec.heldout_fraction,
        min_chars=src.min_chars,
        max_bytes=src.max_bytes,
        seed=src.seed,
    )
    for row, block in enumerate(blocks):
        yield plain_document(f"{block.path}:{block.line}", name, row, block.text.encode("utf-8"))


def is_empty(document: Document) -> bool:
    """No text segment has a non-whitespace character (Unicode whitespace: U+3000, U+00A0 and the like count)."""
    return not any(
        s.text.decode("utf-8", errors="replace").strip()
        for s in document.segments
        if s.role == "text"
    )


def iter_documents(
    spec: DataSpec,
    split: str | None = None,
    stats: DocumentStats | None = None,
    skip_invalid: bool = False,
    interleave: bool = False,
) -> Iterator[Document]:
    """Yield the spec's documents of `split`, deterministically (sources in order, rows in order; with
    `interleave`, one document of each source in turn, rows in order).

    Empty documents (no non-whitespace text) are skipped, counted in `stats` and logged at the end.

    Args:
        spec: from `load_data_spec`.
        split: `train`, `heldout` or `all` (None: the spec's `split`).
        stats: optional counters, filled while iterating.
        skip_invalid: skip (log and count) a record with no exact bytes (a lone surrogate, a JSONL line that is
            not UTF-8) instead of refusing it.
        interleave: take the sources in turn (what `data.limit` reads, so that later sources appear).

    Raises:
        ConfigError: an unknown split.
        DataError: a missing or unreadable file, invalid UTF-8 or JSON, a record without the configured fields,
            a lone surrogate (unless `skip_invalid`).
    """
    split = split or spec.split
    if split not in ("train", "heldout", "all"):
        raise ConfigError(f"split {split!r} is unknown; use train, heldout or all")
    stats = stats if stats is not None else DocumentStats()
    per_source = [
        _source_documents(spec, index, src, split, stats, skip_invalid)
        for index, src in enumerate(spec.sources)
    ]
    if interleave:  # one document of each source in turn, so a `limit` reads from every source
        active = list(per_source)
        while active:
            for docs in list(active):
                document = next(docs, None)
                if document is None:
                    active.remove(docs)
                else:
                    yield document
    else:
        for docs in per_source:
            yield from docs
    if stats.num_empty:
        logger.warning(
            "data spec %r: skipped %d empty document(s) (no text)", spec.name, stats.num_empty
        )
    logger.info("data spec %r split %s: %d documents", spec.name, split, stats.num_documents)


def _source_documents(
    spec: DataSpec,
    index: int,
    src: Any,
    split: str,
    stats: DocumentStats,
    skip_invalid: bool,
) -> Iterator[Document]:
    """The documents of source `index` in `split`, empty ones skipped, counted in `stats`."""
    name = source_name(spec, index)
    match src:
        case StdlibSource():
            docs = _iter_stdlib(spec, src, name, split)
        case JsonlSource():
            docs = _iter_jsonl(spec, src, name)
        case ParquetSource():
            docs = _iter_parquet(spec, src, name)
        case TextSource():
            docs = _iter_text(spec, src, name)
        case HfDiskSource():
            docs = _iter_hf_disk(spec, src, name)
        case HfHubSource():
            docs = _iter_hf_hub(spec, src, name)
        case _:
            raise AssertionError(f"unknown source type {type(src).__name__}")
    count = 0
    for document in docs:
        if src.max_documents is not None and count >= src.max_documents:
            break
        count += 1
        if isinstance(document, InvalidRecord):
            if not skip_invalid:
                raise DataError(
                    f"{document.where}: {document.reason}. Fix or drop that record, or skip such records "
                    "with --set skip_untokenizable=true (each one is logged and counted)"
                )
            logger.warning("skipping %s: %s", document.where, document.reason)
            stats.num_invalid += 1
            continue
        if not isinstance(src, StdlibSource) and not _in_split(
            document.doc_id, split, spec.heldout_fraction
        ):
            stats.num_other_split += 1
            continue
        if is_empty(document):
            stats.num_empty += 1
            continue
        stats.num_documents += 1
        stats.per_source[name] = stats.per_source.get(name, 0) + 1
        yield document


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def _file_identity(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    remaining = _HASH_CAP_BYTES
    with path.open("rb") as f:
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return {"size": size, "sha256": h.hexdigest(), "hashed_bytes": min(size, _HASH_CAP_BYTES)}


def _source_identity(spec: DataSpec, index: int) -> dict[str, Any]:
    src = spec.sources[index]
    match src:
        case StdlibSource():
            root = corpus.stdlib_root()
            files = corpus.stdlib_files(root)
            h = hashlib.sha256()
            for rel in files:
                h.update(f"{rel}\0{(root / rel).stat().st_size}\0".encode())
            return {"python": sys.version.split()[0], "files": len(files), "listing": h.hexdigest()}
        case HfHubSource():
            return {
                "dataset": src.dataset,
                "config": src.config,
                "split": src.split,
                "revision": src.revision,
            }
        case _:
            path = _resolve_or_raise(spec, src.path)  # type: ignore[union-attr]
            if path.is_dir():
                pattern = getattr(src, "glob", "**/*")
                files = sorted(p for p in path.glob(pattern) if p.is_file())
                return {p.relative_to(path).as_posix(): _file_identity(p) for p in files}
            return {path.name: _file_identity(path)}


def data_spec_fingerprint(spec: DataSpec) -> str:
    """sha256 hex of the resolved spec plus the identity of its sources (file sizes and content hashes, capped
    at 64 MiB per file; the stdlib's Python version and file listing; hub ids and revisions).

    Raises:
        DataError: a local source file is missing.
    """
    payload = {
        "spec": spec.model_dump(mode="json"),
        "sources": [_source_identity(spec, i) for i in range(len(spec.sources))],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(spec: DataSpec, split: str | None = None, limit: int | None = None) -> str:
    """Fingerprint of exactly what a run reads: the spec's fingerprint, the split, and a document limit."""
    blob = json.dumps(
        {"spec": data_spec_fingerprint(spec), "split": split or spec.split, "limit": limit},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()
