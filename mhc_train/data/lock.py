"""A blocking advisory file lock for data preparation: one process per filesystem prepares, the others wait on it.

The kernel drops a `flock` when its holder dies, so a killed prepare frees the lock without any staleness heuristic.
A waiting process is never inside a collective: it polls the lock, logging who holds it and how far that build has
come every `report_s` seconds, for as long as the build takes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from mhc_train.io.log import get_logger, progress

logger = get_logger(__name__)


def write_holder(fd: int, **extra) -> None:
    """Replace the holder record in an open lock file: pid, host, since, and `extra` (e.g. a build directory). The
    run directory's lock (`mhc_train.train.lock`) writes and reads the same record."""
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(rec).encode(), 0)
    os.fsync(fd)


def read_holder(fd: int) -> dict:
    """The holder record of an open lock file ({} when it is empty or unreadable)."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


class PrepareLock:
    """`with PrepareLock(path, how_far):` holds the lock on `path` (created when missing). While waiting it logs a
    "data.prepare" progress record, stage "waiting", on every rank.

    Args:
        how_far: called with the holder record while waiting; returns a short "how far" phrase ("" for unknown).
    """

    def __init__(self, path: Path, how_far: Callable[[dict], str] = lambda h: "",
                 poll_s: float = 0.5, report_s: float = 30.0):  # fmt: skip
        self.path, self.how_far = Path(path), how_far
        self.poll_s, self.report_s = poll_s, report_s
        self._fd: int | None = None

    def __enter__(self) -> PrepareLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only data.out_dir: nothing can be built there, so nothing to serialise
            return self
        last_report = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if last_report is None or now - last_report >= self.report_s:
                    holder = read_holder(fd)
                    how_far = self.how_far(holder)
                    progress(
                        logger,
                        "data.prepare",
                        f"prepare: waiting for PID {holder.get('pid', '?')} on {holder.get('host', '?')}, which "
                        f"is preparing data in {self.path.parent} (since {holder.get('since', '?')})"
                        + (f": {how_far}" if how_far else ""),
                        stage="waiting",
                        all_ranks=True,
                    )
                    last_report = now
                time.sleep(self.poll_s)
        self._fd = fd
        self.record()
        return self

    def record(self, **extra) -> None:
        """Write the holder record (pid, host, since, and `extra`, e.g. the build directory) into the lock file."""
        if self._fd is not None:
            write_holder(self._fd, **extra)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
