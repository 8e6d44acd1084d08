"""One run per output folder: a lock file holding the running process's pid and host.

``rlfuse train`` takes ``<output_dir>/.rlfuse.lock`` before it writes anything there and drops it when it ends.
A second run on the same folder is refused with the holder named. A lock whose process is gone (a run killed
with ``kill -9`` or a lost machine, on this host) is stale: it is taken over, with a log line.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_FILE = ".rlfuse.lock"


class RunLockedError(ValueError):
    """Another live run holds the output folder."""


def _alive(pid: int) -> bool:
    """True when a process with ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> Optional[dict]:
    """The lock's ``{"pid", "host", "started"}``, or None when it is unreadable (written halfway by a crash)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


class RunLock:
    """The lock on ``folder``: :meth:`acquire` takes it, :meth:`release` drops it (idempotent).

    Args:
        folder: the run's output folder (it must exist).
        log: where the take-over of a stale lock is reported (default ``print``).
    """

    def __init__(self, folder: Path, log=print):
        self.path = Path(folder) / LOCK_FILE
        self.log = log
        self.held = False

    def acquire(self) -> "RunLock":
        """Take the lock, or take over a stale one.

        Raises:
            RunLockedError: a live process on this host holds it, or a process on another host does (its
                liveness cannot be checked from here); the message names pid, host and start time, and the way on.
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a lost race with another starting run ends in its error, below
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is not None and not self._stale(holder):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another rlfuse run (pid {holder['pid']} on "
                        f"{holder.get('host')}, started {holder.get('started')}); wait for it to end, choose another "
                        f"--output-dir, or, if that run is gone, delete {self.path}") from None
                what = "unreadable" if holder is None else f"left by pid {holder['pid']}, which is not running"
                self.log(f"rlfuse: taking over the stale lock {self.path} ({what})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}: another run keeps taking it")

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        # This process's own pid: a lock left by an earlier run in this process that never released it.
        return holder["pid"] == os.getpid() or not _alive(holder["pid"])

    def release(self) -> None:
        """Drop the lock if this object holds it."""
        if self.held:
            self.held = False
            holder = _holder(self.path)
            if holder is not None and holder["pid"] == os.getpid():
                self.path.unlink(missing_ok=True)
