"""The store card: a `README.md` inside a finished teacher store, written by finalize (`docs/store.md`).

Owns the card's content, rendered from the typed manifest alone (`alm.store.manifest.StoreManifest`): the teacher, the data spec, the stored fields with dtype
and shape, sizes, fingerprints, the command that made the store, and how to read it with plain zarr + pyarrow. The
card is for people; programs read `alm-store.json`. Pure string formatting; imports nothing beyond the standard
library and the manifest model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alm.store.manifest import StoreManifest

CARD_FILE = "README.md"


def _size(num_bytes: int) -> str:
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{num_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


def render_card(manifest: StoreManifest, format_name: str) -> str:
    """The store card (Markdown) of a finished store's manifest (`finalize.build_manifest`)."""
    command = manifest.plan.get("command") or ""
    num_shards = len(manifest.shards)
    tokens = max(manifest.num_tokens, 1)
    fields = "\n".join(
        f"| `{name}` | {spec['dtype']} | {spec['shape']} |"
        + (f" encoding {spec['encoding']}" if spec.get("encoding") else "")
        for name, spec in manifest.fields.items()
    )
    made_by = (
        f"```\n{command}\n```\n"
        + (
            f"\n({num_shards} shards: each worker ran this command with its own `--shard i/N`.)\n"
            if "--shard" in command and num_shards > 1
            else ""
        )
        if command
        else "not recorded (the store predates command recording, or was written through the Python API).\n"
    )
    return f"""# Teacher store: {manifest.teacher_model}

An `alm` teacher store (format `{format_name}` v{manifest.format_version}) for offline distillation
with Approximate Likelihood Matching. This card is written by `alm store finalize` from `alm-store.json`, which
is the authority; the format is documented in alm's `docs/store.md`.

## Teacher and data

| | |
|---|---|
| teacher | `{manifest.teacher_model}` (revision `{manifest.teacher_revision}`, config hash `{manifest.teacher_config_hash}`) |
| teacher tokenizer fingerprint | `{manifest.tokenizer_fingerprint}` |
| data spec | `{manifest.data_spec_name}` (fingerprint `{manifest.data_spec_fingerprint}`) |
| backend | `{manifest.backend}`, boundary method `{manifest.boundary_method}` |
| max length | {manifest.max_length} teacher tokens per sequence |
| top-k | {manifest.top_k or "not stored"} |
| plan fingerprint | `{manifest.plan_fingerprint}` |
| finalized | {manifest.created_at} |

## Made by

{made_by}
## Fields (per teacher token, flat over a shard's N tokens)

| field | dtype | shape |
|---|---|---|
{fields}

## Sizes

{num_shards} shards, {manifest.num_sequences} sequences, {manifest.num_tokens} teacher tokens,
{manifest.num_text_bytes} text bytes; shard files {_size(manifest.num_disk_bytes)}
({manifest.num_disk_bytes / tokens:.1f} bytes per teacher token; precision `{manifest.plan.get("precision", "exact")}`,
compression `{manifest.plan.get("compression", "small")}`).

## Reading it without alm

```python
import json

import pyarrow as pa
import zarr

STORE = "."  # this folder
manifest = json.load(open(f"{{STORE}}/alm-store.json"))
for shard in manifest["shards"]:
    root = f"{{STORE}}/{{shard['path']}}"
    index = pa.ipc.open_stream(pa.input_stream(f"{{root}}/index.arrows.zst", compression="zstd")).read_all()
    arrays = zarr.open_group(f"{{root}}/arrays", mode="r")
    token_id = arrays["token_id"][:]  # sequence i owns rows index["token_start"][i]:index["token_end"][i]
```

With alm: `alm.open_store(".")`; to share it: `alm store push . URL` and `alm store pull URL DIR`.
"""
