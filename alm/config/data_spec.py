"""The data spec schema (`data_specs/*.yaml`): where text comes from and how it becomes documents.

A data spec lists *sources* (local JSONL, Parquet, text files or folders, a Hugging Face `datasets` folder saved
with `save_to_disk`, a hub dataset, or the built-in stdlib corpus). Each source is plain text (one field, one file
or one line per document) or chat (a list of messages with role and content; the loss region is `all`,
`assistant` or `last_assistant`, ALM_SPEC §3). Splits: `train` / `heldout` / `all`, by a hash of each document's id
(the stdlib corpus hashes the file path, so a file's docstrings never straddle the split).

Validation here is pure (no file system, no network); `alm.data.specs.load_data_spec` adds the file checks.
Imports only `alm.config.load` (and pydantic).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, model_validator

from alm.config.load import StrictModel

Split = Literal["train", "heldout", "all"]
LossRegion = Literal["all", "assistant", "last_assistant"]


class ChatFormat(StrictModel):
    """How a chat record is laid out, and which part of it is trained on."""

    messages_field: str = Field(
        default="messages", description="Field holding the list of messages."
    )
    role_field: str = Field(default="role", description="Key of a message's role.")
    content_field: str = Field(default="content", description="Key of a message's text.")
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Renames of roles, e.g. {human: user, gpt: assistant, model: assistant}; `system`, `user` "
        "and `assistant` are always accepted.",
    )
    loss: LossRegion = Field(
        default="assistant",
        description="Loss region: `all` text, `assistant` turns, or only the `last_assistant` turn.",
    )
    prompt_field: str | None = Field(
        default=None,
        description="Instead of a messages list: field of a single user prompt (with `response_field`).",
    )
    response_field: str | None = Field(
        default=None, description="Field of the single assistant response (with `prompt_field`)."
    )

    @model_validator(mode="after")
    def _prompt_response_pair(self) -> ChatFormat:
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError(
                "set both prompt_field and response_field, or neither (then messages_field is used)"
            )
        return self


class _SourceBase(StrictModel):
    name: str | None = Field(
        default=None,
        description="Name recorded as each document's `source` (default: derived from the path/name).",
    )
    kind: Literal["text", "chat"] = Field(
        default="text", description="`text` (plain documents) or `chat`."
    )
    text_field: str = Field(
        default="text", description="Field holding the text (kind `text`, tabular sources)."
    )
    chat: ChatFormat = Field(default_factory=ChatFormat, description="Chat layout (kind `chat`).")
    id_field: str | None = Field(
        default=None,
        description=(
            "Field holding a stable document id (tabular sources: jsonl, parquet, hf): the document's id becomes "
            "`SOURCE:VALUE`, so the held-out split does not move when rows are reordered. null: `SOURCE:row`."
        ),
    )
    max_documents: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many documents from this source (before the split).",
    )


class JsonlSource(_SourceBase):
    """A JSON Lines file: one JSON object per line."""

    type: Literal["jsonl"]
    path: str = Field(
        description="Path of the .jsonl file (relative to the spec's folder or the cwd)."
    )


class ParquetSource(_SourceBase):
    """A Parquet file (or a folder of them, read in sorted order)."""

    type: Literal["parquet"]
    path: str = Field(description="Path of a .parquet file or a folder of them.")


class TextSource(_SourceBase):
    """UTF-8 text files: one document per file or per line."""

    type: Literal["text"]
    path: str = Field(description="A text file or a folder (files matched by `glob`, sorted).")
    glob: str = Field(default="**/*.txt", description="Files to read when `path` is a folder.")
    unit: Literal["file", "line"] = Field(
        default="file", description="One document per `file` or per `line`."
    )

    @model_validator(mode="after")
    def _text_only(self) -> TextSource:
        if self.kind != "text":
            raise ValueError(
                "text files hold plain text: use kind text (chat needs jsonl, parquet or datasets)"
            )
        if self.id_field is not None:
            raise ValueError("id_field needs records with fields (jsonl, parquet, datasets)")
        return self


class HfDiskSource(_SourceBase):
    """A Hugging Face `datasets` folder written with `save_to_disk` (read with `load_from_disk`)."""

    type: Literal["hf_disk"]
    path: str = Field(
        description="Folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."
    )
    split: str | None = Field(
        default=None,
        description="Split of a DatasetDict to read (default: `train`, or the only one).",
    )


class HfHubSource(_SourceBase):
    """A dataset on the Hugging Face hub (needs internet; streamed)."""

    type: Literal["hf_hub"]
    dataset: str = Field(description="Hub dataset id, e.g. allenai/tulu-3-sft-mixture.")
    config: str | None = Field(default=None, description="Dataset configuration (subset) name.")
    split: str = Field(default="train", description="Hub split to read.")
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag, commit) for reproducibility."
    )
    streaming: bool = Field(
        default=True, description="Stream rows instead of downloading the whole dataset."
    )


class StdlibSource(_SourceBase):
    """The built-in offline corpus: docstrings and comments of this Python's standard library (read with `ast`)."""

    type: Literal["stdlib"]
    min_chars: int = Field(
        default=64, ge=1, description="Skip blocks shorter than this (characters)."
    )
    max_bytes: int | None = Field(
        default=4_000_000, ge=1, description="Stop after this many UTF-8 bytes of text (size cap)."
    )
    seed: int | None = Field(
        default=0,
        description="Order in which files are visited (None: sorted by path; an int: seeded shuffle).",
    )

    @model_validator(mode="after")
    def _text_only(self) -> StdlibSource:
        if self.kind != "text":
            raise ValueError("the stdlib corpus is plain text: use kind text")
        if self.id_field is not None:
            raise ValueError("id_field needs records with fields (jsonl, parquet, datasets)")
        return self


Source = Annotated[
    JsonlSource | ParquetSource | TextSource | HfDiskSource | HfHubSource | StdlibSource,
    Field(discriminator="type"),
]


class DataSpec(StrictModel):
    """A data spec: named sources, read in order, split deterministically into train / held-out."""

    name: str = Field(description="Name recorded in teacher stores.")
    description: str = Field(default="", description="Free text.")
    sources: list[Source] = Field(min_length=1, description="Sources, read in order.")
    split: Split = Field(
        default="train",
        description="Split read when the recipe names none: `train`, `heldout` or `all`.",
    )
    heldout_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of documents (by a hash of their id; stdlib: of files by path) held out.",
    )

    # Folder of the YAML file the spec was loaded from (relative source paths are looked up there first).
    _base_dir: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _heldout_needs_fraction(self) -> DataSpec:
        if self.split == "heldout" and self.heldout_fraction == 0.0:
            raise ValueError("split heldout needs heldout_fraction > 0 (e.g. 0.05), or it is empty")
        return self
