"""Where a store lives: a local folder or an fsspec URL (`memory://`, `s3://`, `gs://`, ...).

Owns the few file operations the store needs, each with a local fast path and an fsspec path: read/write small
files (atomic on local disks: temp file + `os.replace`; a single PUT on object stores), list folders, remove a
subtree, rename a finished shard folder (local only; object stores have no atomic rename, see `docs/store.md`),
and a Zarr store for a sub-path. Imports fsspec and zarr only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import zarr.storage

from alm.errors import StoreError


@dataclass(frozen=True)
class Location:
    """A store root: a local absolute path, or an fsspec filesystem plus the path inside it."""

    url: str
    root: str
    fs: Any  # fsspec.AbstractFileSystem
    is_local: bool

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def exists(self, *parts: str) -> bool:
        p = self.path(*parts)
        return os.path.exists(p) if self.is_local else self.fs.exists(p)

    def read_bytes(self, *parts: str) -> bytes:
        p = self.path(*parts)
        try:
            if self.is_local:
                return Path(p).read_bytes()
            return self.fs.cat_file(p)
        except FileNotFoundError as err:
            raise StoreError(f"{self.url}: missing file {p}") from err

    def read_json(self, *parts: str) -> Any:
        """Parse a JSON file of the store.

        Raises:
            StoreError: missing or not valid JSON (a corrupt or foreign file).
        """
        data = self.read_bytes(*parts)
        try:
            return json.loads(data)
        except ValueError as err:
            raise StoreError(
                f"{self.url}: {self.path(*parts)} is not valid JSON ({err}); the store is corrupt"
            ) from err

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file; atomic on local disks (temp + rename), one PUT on object stores.

        Raises:
            StoreError: the write failed (full disk, quota, permissions): the previous file is intact and the
                temp file removed.
        """
        p = self.path(*parts)
        if self.is_local:
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, p)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise write_error(err, f"{len(data):,} bytes to {p}", self.url) from None
        else:
            parent = p.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(p, data)

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder; empty if it does not exist."""
        p = self.path(*parts)
        if self.is_local:
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        if not self.fs.exists(p):
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(p, detail=False))

    def isdir(self, *parts: str) -> bool:
        p = self.path(*parts)
        return os.path.isdir(p) if self.is_local else self.fs.isdir(p)

    def remove(self, *parts: str) -> None:
        """Remove a file or folder tree if it exists."""
        p = self.path(*parts)
        if self.is_local:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def rename_dir(self, src_parts: str, dst_parts: str) -> bool:
        """Rename a folder atomically (local only); False if the destination already exists."""
        assert self.is_local
        try:
            os.rename(self.path(src_parts), self.path(dst_parts))
        except OSError:
            if os.path.exists(self.path(dst_parts)):
                return False
            raise
        return True

    def size_bytes(self, *parts: str) -> int:
        """Total size of the files under a path."""
        p = self.path(*parts)
        if self.is_local:
            if os.path.isfile(p):
                return os.path.getsize(p)
            return sum(
                os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(p) for f in files
            )
        return int(self.fs.du(p, total=True)) if self.fs.exists(p) else 0

    def zarr_store(self, *parts: str, read_only: bool) -> Any:
        p = self.path(*parts)
        if self.is_local:
            return zarr.storage.LocalStore(p, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.fs.unstrip_protocol(p), read_only=read_only)


def write_error(err: OSError, what: str, url: str) -> StoreError:
    """A failed write as a user message: what ran out (disk space, quota) or what failed, and what to do."""
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
    }.get(err.errno or 0, err.strerror or str(err))
    return StoreError(
        f"writing {what} failed: {reason} ({type(err).__name__} {err.errno}). Nothing partial was kept (the "
        f"previous state of {url} is intact, temp files were removed); free space or fix the location and rerun "
        "the same command: finished shards are kept"
    )


def locate(path_or_url: str | os.PathLike[str]) -> Location:
    """Resolve a store path or URL. `file://` URLs and plain paths are local; anything else goes to fsspec.

    Raises:
        StoreError: the URL's filesystem is not installed (names the package to install).
    """
    url = os.fspath(path_or_url)
    if "://" not in url or url.startswith("file://"):
        local = url[len("file://") :] if url.startswith("file://") else url
        root = os.path.abspath(os.path.expanduser(local))
        return Location(url=url, root=root, fs=fsspec.filesystem("file"), is_local=True)
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise StoreError(
            f"cannot open store URL {url!r}: {err}; install the fsspec filesystem package for its scheme "
            "(e.g. `pip install s3fs` for s3://, `gcsfs` for gs://)"
        ) from err
    return Location(url=url, root=root.rstrip("/"), fs=fs, is_local=False)
