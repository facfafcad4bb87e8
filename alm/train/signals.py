"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, `kill`, torchrun's shutdown).

`StopSignals` owns the two handlers while `alm train` runs. Before the step loop a signal stops the run at once
(`RunInterruptedError`: nothing to save yet). Inside the loop (`deferring = True`) the first signal is only recorded:
the loop finishes the optimizer step it is in, saves a checkpoint and then raises `RunInterruptedError`, so
`--resume` continues bit for bit. A second signal stops at once, without a checkpoint.

Imports only `alm.errors` and the standard library.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from alm.errors import AlmError

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterruptedError(AlmError):
    """The run stopped on a signal. The CLI prints the message and exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: SIGINT/SIGTERM handlers for the duration of a run (main thread only; else a no-op)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self.setup_hint = "nothing was saved: rerun the same command to start again"
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A signal arrived (while deferring): stop after the current step."""
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.deferring:
            raise RunInterruptedError(
                f"interrupted ({name}) before the first training step; {self.setup_hint}", signum
            )
        if self.signum is not None:
            raise RunInterruptedError(
                f"interrupted again ({name}): stopped at once, without a checkpoint for this step; "
                "rerun with --resume to continue from the last checkpoint",
                signum,
            )
        self.signum = signum
        logger.warning(
            "%s: finishing this step and saving a checkpoint (send it again to stop at once)", name
        )
