"""The run lock of `alm train`: one live invocation per run folder (docs/training.md "Outputs").

`RunLock(output_dir)` is `OUTPUT/.alm-run.lock`, a JSON file with the holder's host, pid and start time, created
atomically (a complete temp file hard-linked to the lock name, which fails when the name exists; the store's shard
claims use the same protocol). It is taken before the run folder is prepared and held until the run ends, so a
second `alm train` on the same folder (with or without `--resume` or `--overwrite`) is refused with exit 2 naming
the holder, even while the first has not written its first checkpoint. A lock whose process is gone on this host
(kill -9, a crashed node's restart) is stale and taken over; a lock from another host cannot be checked from here
and is refused, with the path to delete if that process is gone. Under torchrun only rank 0 takes it.

Imports the standard library and `alm.errors` only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from alm.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_FILE = ".alm-run.lock"


def is_lock_entry(name: str) -> bool:
    """A folder entry that belongs to the lock (the lock, or its temp/stale names), not to a run."""
    return name.startswith(LOCK_FILE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock's holder (`host`, `pid`, `started_at`), or None when the folder has no lock file."""
    path = Path(output_dir) / LOCK_FILE
    return read_lock_file(path) if os.path.lexists(path) else None


def read_lock_file(path: Path) -> dict[str, Any]:
    """The holder recorded in one lock file (unreadable: marked so, which counts as stale)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"host": None, "pid": None, "started_at": "?", "unreadable": True}


def _stale(holder: dict[str, Any]) -> bool:
    if holder.get("unreadable"):
        return True  # locks are written whole before they are linked: only a foreign file is unreadable
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and (
        not isinstance(pid, int) or not _pid_alive(pid)
    )


def _busy_message(output_dir: Path, holder: dict[str, Any]) -> str:
    return (
        f"output_dir {output_dir} is in use by another alm train: host {holder.get('host')!r} pid "
        f"{holder.get('pid')} (since {holder.get('started_at')}). Wait for it to finish or stop it (Ctrl-C "
        f"saves a checkpoint), or choose another output_dir. If that process is gone (e.g. on another "
        f"machine), delete {output_dir / LOCK_FILE} and rerun"
    )


def check_run_lock(output_dir: str | os.PathLike[str]) -> None:
    """Refuse, without writing anything, a folder whose lock a live process holds (`--dry-run`).

    Raises:
        ConfigError: a live process on this host, or any process on another host, holds the lock.
    """
    holder = read_lock(output_dir)
    if holder is not None and not _stale(holder) and holder.get("pid") != os.getpid():
        raise ConfigError(_busy_message(Path(output_dir), holder))


class RunLock:
    """Context manager holding `OUTPUT/.alm-run.lock` for the duration of a run (module docstring)."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, creating the (new or empty) output folder if needed.

        Raises:
            ConfigError: another live invocation (or one on another host) holds it.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        for _ in range(3):
            holder = read_lock(self.output_dir)
            if holder is not None and not _stale(holder):
                raise ConfigError(_busy_message(self.output_dir, holder))
            if holder is not None:
                logger.warning(
                    "taking over the stale run lock %s (host %r pid %s is gone)",
                    self.path,
                    holder.get("host"),
                    holder.get("pid"),
                )
                grave = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, grave)
                    # another invocation may have replaced the stale lock in between: give a live one back
                    if not _stale(read_lock_file(grave)):
                        with contextlib.suppress(FileExistsError):
                            os.link(grave, self.path)
                    grave.unlink()
            tmp = self.path.with_name(f"{LOCK_FILE}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    continue  # someone else was faster: look at who
                self.held = True
                return
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        raise ConfigError(
            f"could not take the run lock {self.path}: other invocations keep taking it"
        )

    def release(self) -> None:
        """Remove the lock if this object took it."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
