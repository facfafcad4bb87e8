"""The typed store manifest: what `alm-store.json` (or, for an unfinished store, the plan) says about a store.

Owns the one reading of the manifest document: every reader of a store's facts (the reader, `alm store
inspect`, `alm store verify`, `alm verify`, `alm precompute`'s summary and training) uses `StoreManifest`
instead of looking keys up in the JSON. Values an older writer recorded only in the embedded plan are taken from
there, so stores of format versions 1 and 2 read the same way (`tests/assets/store_v1`). Pure: imports the
standard library and `alm.store.schema` only; the document itself is written by `alm.store.finalize`
(`docs/store.md` describes its keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alm.store import schema


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard as the manifest records it (a copy of the main facts of its `shard.json`).

    Attributes:
        index: the shard number j (folder `schema.shard_path(j)`).
        num_sequences: sequences stored in the shard.
        num_tokens: teacher tokens stored in the shard.
        num_text_bytes: UTF-8 bytes of the stored texts.
        num_disk_bytes: bytes the shard's files take (0 when not recorded).
        arrays: per-field `{dtype, shape, sha256}` as recorded.
        index_sha256: sha256 of the index file (`index.arrows.zst`, v1/v2 `index.arrow`; None when not recorded).
        checksum: the checksum of its `shard.json` (None for stores written before checksums).
    """

    index: int
    num_sequences: int
    num_tokens: int
    num_text_bytes: int
    num_disk_bytes: int
    arrays: Mapping[str, Any]
    index_sha256: str | None
    checksum: str | None

    @property
    def path(self) -> str:
        """The shard's folder relative to the store root."""
        return schema.shard_path(self.index)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ShardRecord:
        """From a manifest's shard entry (`index`) or a `shard.json` (`shard_index`)."""
        index = doc["index"] if "shard_index" not in doc else doc["shard_index"]
        index_sha = doc.get("index_sha256")
        if index_sha is None and isinstance(doc.get("index"), Mapping):
            index_sha = doc["index"].get("sha256")
        return cls(
            index=int(index),
            num_sequences=int(doc["num_sequences"]),
            num_tokens=int(doc["num_tokens"]),
            num_text_bytes=int(doc.get("num_text_bytes", 0)),
            num_disk_bytes=int(doc.get("num_disk_bytes", 0)),
            arrays=dict(doc.get("arrays", {})),
            index_sha256=index_sha,
            checksum=doc.get("checksum"),
        )


@dataclass(frozen=True)
class StoreManifest:
    """A store's facts, typed (`alm-store.json`, or the plan of an unfinished store).

    Attributes:
        finished: the store has a manifest (all shards committed).
        format_version: the store format version (`schema.READABLE_FORMAT_VERSIONS`).
        teacher_model: HF id or path of the teacher.
        teacher_revision: its revision, if known.
        teacher_config_hash: hash of its config.
        tokenizer_fingerprint: `Vocab.fingerprint()` of the teacher tokenizer.
        data_spec_name: name of the data spec.
        data_spec_fingerprint: fingerprint of the resolved data spec.
        backend: `hf` or `vllm`.
        boundary_method: how `boundary_logmass` was computed (`exact`, `token_ids`, `topk_lower`, ...).
        boundary_top_k: the k of a top-k fallback; 0 for exact methods.
        fields: stored per-token fields, name -> `{dtype, shape, encoding?, mantissa_bits?}`.
        top_k: k of the stored top-k (0 when not stored).
        max_length: teacher tokens per sequence at most (None when not recorded).
        hidden_size: teacher hidden size d when `hidden` is stored, else 0.
        hidden_encoding: `bfloat16` or `float16` when `hidden` is stored, else None.
        num_shards: the planned number of shards (None when not recorded).
        settings: other result-deciding settings (template family, teacher dtype, ...).
        plan: the plan document the store was written from (`StorePlan.from_json` reads it).
        plan_fingerprint: fingerprint of that plan.
        shards: the committed shards, in shard order.
        files: inventory of the store-level files, path -> `{num_bytes, crc32c}` (v2: `sha256`).
        recorded_totals: the manifest's `totals` (empty for an unfinished store); `alm store verify` compares them
            with the shards.
        created_at: when the manifest was written (UTC, ISO 8601); None for an unfinished store.
    """

    finished: bool
    format_version: int
    teacher_model: str | None
    teacher_revision: str | None
    teacher_config_hash: str | None
    tokenizer_fingerprint: str | None
    data_spec_name: str | None
    data_spec_fingerprint: str | None
    backend: str | None
    boundary_method: str | None
    boundary_top_k: int
    fields: Mapping[str, Mapping[str, Any]]
    top_k: int
    max_length: int | None
    hidden_size: int
    hidden_encoding: str | None
    num_shards: int | None
    settings: Mapping[str, Any]
    plan: Mapping[str, Any]
    plan_fingerprint: str | None
    shards: tuple[ShardRecord, ...]
    files: Mapping[str, Mapping[str, Any]]
    recorded_totals: Mapping[str, int]
    created_at: str | None = None

    @property
    def shard_indices(self) -> list[int]:
        return [s.index for s in self.shards]

    @property
    def num_sequences(self) -> int:
        return sum(s.num_sequences for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_text_bytes(self) -> int:
        return sum(s.num_text_bytes for s in self.shards)

    @property
    def num_disk_bytes(self) -> int:
        return sum(s.num_disk_bytes for s in self.shards)

    def shard(self, shard_index: int) -> ShardRecord:
        """The record of one shard (KeyError when it is not committed)."""
        for record in self.shards:
            if record.index == shard_index:
                return record
        raise KeyError(shard_index)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StoreManifest:
        """Read a finished store's manifest document (format version 1 or 2).

        Raises:
            KeyError, TypeError, ValueError: a required entry is missing or malformed (the reader reports the
                manifest as damaged).
        """
        plan = dict(doc.get("plan") or {})
        teacher = doc.get("teacher") or {}
        data_spec = doc.get("data_spec") or {}
        backend = doc.get("backend") or {}
        return cls._build(
            finished=True,
            format_version=int(doc["format_version"]),
            teacher_model=teacher.get("model"),
            teacher_revision=teacher.get("revision"),
            teacher_config_hash=teacher.get("config_hash"),
            tokenizer_fingerprint=doc.get("tokenizer_fingerprint"),
            data_spec_name=data_spec.get("name"),
            data_spec_fingerprint=data_spec.get("fingerprint"),
            backend=backend.get("name"),
            boundary_method=backend.get("boundary_method"),
            boundary_top_k=backend.get("boundary_top_k"),
            fields=doc["fields"],
            top_k=doc.get("top_k"),
            max_length=doc.get("max_length"),
            settings=doc.get("settings"),
            plan=plan,
            plan_fingerprint=doc.get("plan_fingerprint"),
            shards=tuple(ShardRecord.from_json(s) for s in doc["shards"]),
            files=doc.get("files") or {},
            recorded_totals={k: int(v) for k, v in (doc.get("totals") or {}).items()},
            created_at=doc.get("created_at"),
        )

    @classmethod
    def from_plan(
        cls, plan_doc: Mapping[str, Any], shard_docs: list[Mapping[str, Any]]
    ) -> StoreManifest:
        """The facts of an unfinished store: its plan document and the `shard.json` of each committed shard.

        Raises:
            KeyError, TypeError, ValueError: the plan lacks a required entry.
        """
        return cls._build(
            finished=False,
            format_version=int(plan_doc.get("format_version", schema.FORMAT_VERSION)),
            fields=plan_doc["field_specs"],
            plan=dict(plan_doc["plan"]),
            plan_fingerprint=plan_doc.get("plan_fingerprint"),
            shards=tuple(
                sorted((ShardRecord.from_json(d) for d in shard_docs), key=lambda s: s.index)
            ),
            files={},
            recorded_totals={},
        )

    @classmethod
    def _build(
        cls,
        *,
        plan: dict[str, Any],
        fields: Mapping[str, Mapping[str, Any]],
        **recorded: Any,
    ) -> StoreManifest:
        """Fill each fact from the manifest's own entry, else from the plan (where older writers kept it)."""

        def fact(name: str, plan_key: str | None = None) -> Any:
            value = recorded.pop(name, None)
            return value if value is not None else plan.get(plan_key or name)

        hidden = fields.get("hidden")
        num_shards = fact("num_shards")
        max_length = fact("max_length")
        return cls(
            finished=recorded.pop("finished"),
            format_version=recorded.pop("format_version"),
            teacher_model=fact("teacher_model"),
            teacher_revision=fact("teacher_revision"),
            teacher_config_hash=fact("teacher_config_hash"),
            tokenizer_fingerprint=fact("tokenizer_fingerprint"),
            data_spec_name=fact("data_spec_name"),
            data_spec_fingerprint=fact("data_spec_fingerprint"),
            backend=fact("backend"),
            boundary_method=fact("boundary_method"),
            boundary_top_k=int(fact("boundary_top_k") or 0),
            fields={name: dict(spec) for name, spec in fields.items()},
            top_k=int(fact("top_k") or 0),
            max_length=int(max_length) if max_length else None,
            hidden_size=int(hidden["shape"][-1]) if hidden else 0,
            hidden_encoding=hidden.get("encoding") if hidden else None,
            num_shards=int(num_shards) if num_shards is not None else None,
            settings=dict(fact("settings") or {}),
            plan=plan,
            plan_fingerprint=recorded.pop("plan_fingerprint"),
            shards=recorded.pop("shards"),
            files=dict(recorded.pop("files")),
            recorded_totals=recorded.pop("recorded_totals"),
            created_at=recorded.pop("created_at", None),
        )
