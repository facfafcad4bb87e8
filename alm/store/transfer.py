"""Sharing a finished teacher store: `alm store push STORE URL` and `alm store pull URL DIR` (`docs/store.md`).

Owns the file listing of a store (`alm-store.files.json`: path, size and sha256 of every file that belongs to the
finished store) and the two transfers. Both are resumable (a file already at the destination with the listed size
and sha256 is skipped) and both verify after transfer: push reads every uploaded file back and hashes it; pull
hashes every downloaded file against the listing, then checks the arrays and indexes against the checksums the
manifest itself records, so a tampered listing cannot pass either. The manifest (`alm-store.json`) always goes
last, so a half-pushed or half-pulled store never looks finished. Any fsspec URL works as the remote (a folder,
`memory://`, `s3://`, `gs://`, a Hugging Face dataset repository as `hf://datasets/ORG/NAME`); pull writes a local
folder. Imports fsspec (through `_fs`), numpy, pyarrow and zarr only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from alm.errors import StoreError
from alm.store import schema
from alm.store._fs import Location, locate
from alm.store.card import CARD_FILE
from alm.store.fingerprint import array_checksum, bytes_fingerprint
from alm.store.manifest import StoreManifest
from alm.store.reader import read_shard_arrays

logger = logging.getLogger(__name__)

FILES_FILE = "alm-store.files.json"
_COPY_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class TransferReport:
    """What a push or pull did: files and bytes copied, files skipped because they were already there."""

    url: str
    num_files: int
    num_copied: int
    num_skipped: int
    num_bytes_copied: int

    def summary(self, verb: str) -> str:
        return (
            f"{verb} {self.url}: {self.num_files} files, {self.num_copied} copied "
            f"({self.num_bytes_copied} bytes), {self.num_skipped} already present and verified"
        )


def _walk(location: Location, folder: str) -> list[str]:
    """Store-relative paths of the files under a folder (sorted); unfinished `.tmp-*` files excluded."""
    out: list[str] = []
    for name in location.listdir(folder):
        rel = f"{folder}/{name}"
        if ".tmp-" in name:
            continue
        if location.isdir(rel):
            out.extend(_walk(location, rel))
        else:
            out.append(rel)
    return out


def _hash_file(location: Location, rel: str) -> tuple[int, str]:
    """(size, sha256) of one file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with location.fs.open(location.path(rel), "rb") as fh:
        while block := fh.read(_COPY_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _file_size(location: Location, rel: str) -> int | None:
    p = location.path(rel)
    if location.is_local:
        return os.path.getsize(p) if os.path.isfile(p) else None
    try:
        return int(location.fs.size(p))
    except (FileNotFoundError, OSError):
        return None


def _present(location: Location, rel: str, entry: dict[str, Any]) -> bool:
    """A file is present when it exists with the listed size and sha256."""
    return (
        _file_size(location, rel) == entry["size"]
        and _hash_file(location, rel)[1] == entry["sha256"]
    )


def store_listing(location: Location, manifest_bytes: bytes) -> dict[str, Any]:
    """The file listing of a finished store: every file of the plan, card, vocabulary and listed shards.

    Files outside the manifest's shards (an unfinished `.tmp-*` shard, a stray folder) are not part of the store
    and are not listed; the manifest is listed only by its sha256 (it is transferred last, separately).
    """
    manifest = StoreManifest.from_json(json.loads(manifest_bytes))
    files = [schema.PLAN_FILE]
    if location.exists(CARD_FILE):
        files.append(CARD_FILE)
    files += _walk(location, schema.VOCAB_DIR)
    for shard in manifest.shards:
        files += _walk(location, shard.path)
    if location.isdir("alignments"):
        files += _walk(location, "alignments")
    entries = []
    for rel in files:
        size, sha256 = _hash_file(location, rel)
        entries.append({"path": rel, "size": size, "sha256": sha256})
    return {
        "format": schema.FORMAT_NAME,
        "format_version": schema.FORMAT_VERSION,
        "manifest_sha256": bytes_fingerprint(manifest_bytes),
        "files": entries,
    }


def _finished_manifest(location: Location, role: str) -> bytes:
    if not location.exists(schema.MANIFEST_FILE):
        raise StoreError(
            f"{role} {location.url} is not a finished teacher store (no {schema.MANIFEST_FILE}); "
            + (
                "finish it first with `alm store finalize` (after every shard's precompute)"
                if role == "store"
                else "push a finished store there with `alm store push STORE URL` (a push still in progress "
                "writes the manifest last)"
            )
        )
    data = location.read_bytes(schema.MANIFEST_FILE)
    schema.check_format(json.loads(data), f"{location.url}/{schema.MANIFEST_FILE}")
    return data


def _check_listing_against_manifest(
    listing: dict[str, Any], manifest_bytes: bytes, url: str
) -> None:
    """The listing must describe this manifest, and every shard's index must have the manifest's checksum."""
    if listing.get("manifest_sha256") != bytes_fingerprint(manifest_bytes):
        raise StoreError(
            f"{url}/{FILES_FILE} was made for another manifest than {url}/{schema.MANIFEST_FILE} "
            "(a push was interrupted after replacing one of them); push the store again"
        )
    sha_by_path = {e["path"]: e["sha256"] for e in listing["files"]}
    manifest = StoreManifest.from_json(json.loads(manifest_bytes))
    index_file = schema.index_file(manifest.format_version)
    for shard in manifest.shards:
        rel = f"{shard.path}/{index_file}"
        if sha_by_path.get(rel) != shard.index_sha256:
            raise StoreError(
                f"{url}/{FILES_FILE}: {rel} is listed with sha256 {sha_by_path.get(rel)}, the manifest records "
                f"{shard.index_sha256}; the remote copy is inconsistent, push the store again"
            )


def _copy_file(src: Location, dst: Location, rel: str, entry: dict[str, Any]) -> None:
    """Copy one file, hashing what arrives at the destination.

    Local destinations get a temp file renamed into place only when its sha256 is right; remote destinations
    get one upload, read back and hashed.

    Raises:
        StoreError: the bytes that arrived do not have the listed size and sha256 (names the file).
    """
    if dst.is_local:
        final = dst.path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        digest, size = hashlib.sha256(), 0
        try:
            with src.fs.open(src.path(rel), "rb") as fin, open(tmp, "wb") as fout:
                while block := fin.read(_COPY_BLOCK_BYTES):
                    digest.update(block)
                    size += len(block)
                    fout.write(block)
                fout.flush()
                os.fsync(fout.fileno())
            if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
                raise StoreError(
                    f"{src.url}/{rel} arrived with {size} bytes and sha256 {digest.hexdigest()}, the store "
                    f"lists {entry['size']} bytes and sha256 {entry['sha256']}: the remote copy is corrupt or "
                    "was modified; push the store again from a good copy (`alm verify` checks one)"
                )
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with src.fs.open(src.path(rel), "rb") as fin:
        data = fin.read()
    dst.write_bytes(data, rel)
    size, sha256 = _hash_file(dst, rel)
    if size != entry["size"] or sha256 != entry["sha256"]:
        raise StoreError(
            f"{dst.url}/{rel} reads back with {size} bytes and sha256 {sha256} after upload, the store lists "
            f"{entry['size']} bytes and sha256 {entry['sha256']}; push again (files already right are skipped)"
        )


def _transfer(src: Location, dst: Location, listing: dict[str, Any]) -> TransferReport:
    copied = skipped = num_bytes = 0
    for entry in listing["files"]:
        rel = entry["path"]
        if _present(dst, rel, entry):
            skipped += 1
            continue
        _copy_file(src, dst, rel, entry)
        copied += 1
        num_bytes += entry["size"]
    return TransferReport(dst.url, len(listing["files"]), copied, skipped, num_bytes)


def _refuse_other_store(dst: Location, manifest_bytes: bytes, listing: dict[str, Any]) -> None:
    """A destination may be empty, hold a partial transfer of this store, or this very store."""
    entries = dst.listdir() if dst.isdir() else []
    if not entries:
        return
    if dst.exists(schema.MANIFEST_FILE):
        if dst.read_bytes(schema.MANIFEST_FILE) == manifest_bytes:
            return
        raise StoreError(
            f"{dst.url} already holds another finished teacher store (its {schema.MANIFEST_FILE} differs); "
            "choose a new destination, or remove that store first if it is no longer needed"
        )
    if dst.exists(FILES_FILE):
        try:
            old = dst.read_json(FILES_FILE)
        except StoreError:
            old = {}
        if old.get("manifest_sha256") == listing["manifest_sha256"]:
            return  # an interrupted transfer of this store: resume it
    if schema.PLAN_FILE in entries or FILES_FILE in entries:
        raise StoreError(
            f"{dst.url} holds an unfinished transfer or precompute of another teacher store; choose a new "
            "destination, or remove it first"
        )
    raise StoreError(
        f"{dst.url} is not empty and is not an alm teacher store (found {entries[:5]}); choose an empty or new "
        "destination (alm never writes into, or deletes from, a foreign folder)"
    )


def push_store(store: str | os.PathLike[str], url: str) -> TransferReport:
    """Copy a finished store to any fsspec URL; resumable, every file verified after upload, manifest last.

    Args:
        store: the finished store (folder or URL).
        url: destination, e.g. `s3://bucket/stores/x`, `memory://x`, `hf://datasets/ORG/NAME`, or a folder.

    Raises:
        StoreError: the store is not finished, the destination holds something else, or an uploaded file does
            not read back with its sha256.
    """
    src, dst = locate(store), locate(url)
    manifest_bytes = _finished_manifest(src, "store")
    listing = store_listing(src, manifest_bytes)
    _check_listing_against_manifest(listing, manifest_bytes, src.url)
    _refuse_other_store(dst, manifest_bytes, listing)
    dst.write_bytes(
        json.dumps(listing, indent=1).encode(), FILES_FILE
    )  # first: marks the transfer's store
    report = _transfer(src, dst, listing)
    dst.write_bytes(manifest_bytes, schema.MANIFEST_FILE)
    if dst.read_bytes(schema.MANIFEST_FILE) != manifest_bytes:
        raise StoreError(
            f"{dst.url}/{schema.MANIFEST_FILE} does not read back as written; push again"
        )
    logger.info(report.summary("pushed to"))
    return report


def verify_pulled_arrays(location: Location, manifest: StoreManifest) -> None:
    """Check every shard's arrays against the array checksums the manifest records.

    Raises:
        StoreError: an array's shape, dtype or checksum differs (names the shard and array).
    """
    for shard in manifest.shards:
        arrays = read_shard_arrays(location, shard.path, list(shard.arrays))
        for name, recorded in shard.arrays.items():
            arr = arrays[name]
            if list(arr.shape) != recorded["shape"] or str(arr.dtype) != recorded["dtype"]:
                raise StoreError(
                    f"{location.url}/{shard.path}/{schema.ARRAYS_DIR}/{name}: shape {list(arr.shape)} "
                    f"{arr.dtype}, the manifest records {recorded['shape']} {recorded['dtype']}"
                )
            if array_checksum(arr) != recorded["sha256"]:
                raise StoreError(
                    f"{location.url}/{shard.path}/{schema.ARRAYS_DIR}/{name}: checksum differs from the "
                    "manifest's; the remote copy is corrupt, push it again from a good copy"
                )


def pull_store(url: str, folder: str | os.PathLike[str]) -> TransferReport:
    """Copy a pushed store from any fsspec URL into a local folder; resumable, verified, manifest last.

    An interrupted pull leaves no `alm-store.json`, so it never looks finished; running it again copies only the
    files that are missing or wrong.

    Args:
        url: where the store was pushed (`alm store push`).
        folder: local destination folder (new, empty, or an interrupted pull of the same store).

    Raises:
        StoreError: the remote is not a finished pushed store, the folder holds something else, or a file or
            array does not match its checksum (names it; the manifest is then not written).
    """
    src, dst = locate(url), locate(folder)
    if not dst.is_local:
        raise StoreError(
            f"pull writes a local folder, got {dst.url!r}; to copy between remotes, pull then push"
        )
    manifest_bytes = _finished_manifest(src, "remote")
    if not src.exists(FILES_FILE):
        raise StoreError(
            f"{src.url} has no {FILES_FILE} (it was not copied there by `alm store push`); push it with "
            "`alm store push`, or copy the folder by other means and check it with `alm store finalize`"
        )
    listing_bytes = src.read_bytes(FILES_FILE)
    listing = json.loads(listing_bytes)
    _check_listing_against_manifest(listing, manifest_bytes, src.url)
    _refuse_other_store(dst, manifest_bytes, listing)
    if dst.exists(schema.MANIFEST_FILE):
        dst.remove(
            schema.MANIFEST_FILE
        )  # re-verify an existing copy; the manifest comes back only if it passes
    dst.write_bytes(listing_bytes, FILES_FILE)
    report = _transfer(src, dst, listing)
    verify_pulled_arrays(dst, StoreManifest.from_json(json.loads(manifest_bytes)))
    dst.write_bytes(manifest_bytes, schema.MANIFEST_FILE)
    logger.info(report.summary("pulled from"))
    return report
