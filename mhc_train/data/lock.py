"""A blocking advisory file lock for data preparation: one process per filesystem prepares, the others wait on it.

The lock is `mhc_train.io.lock.FileLock` (flock, or an O_EXCL marker where flock does not work), so a killed prepare
frees the lock without any staleness heuristic.
A waiting process is never inside a collective: it polls the lock, logging who holds it and how far that build has
come every `report_s` seconds, for as long as the build takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from mhc_train.io.lock import FileLock
from mhc_train.io.log import get_logger, progress

logger = get_logger(__name__)


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
        self._lock = FileLock(self.path)

    def __enter__(self) -> PrepareLock:
        last_report = None
        while True:
            try:
                if self._lock.try_acquire():
                    return self
            except OSError:  # a read-only data.out_dir: nothing can be built there, so nothing to serialise
                return self
            now = time.monotonic()
            if last_report is None or now - last_report >= self.report_s:
                holder = self._lock.holder()
                how_far = self.how_far(holder)
                progress(
                    logger,
                    "data.prepare",
                    f"prepare: waiting for PID {holder.get('pid', '?')} on {holder.get('host', '?')}, which "
                    f"is preparing data in {self.path.parent} (since {holder.get('since', '?')})"
                    + (f": {how_far}" if how_far else "")
                    + (f" ({self._lock.describe()})" if self._lock.uses_marker else ""),
                    stage="waiting",
                    all_ranks=True,
                )
                last_report = now
            time.sleep(self.poll_s)

    def record(self, **extra) -> None:
        """Write the holder record (pid, host, since, and `extra`, e.g. the build directory) into the lock file."""
        self._lock.record(**extra)

    def __exit__(self, *exc) -> None:
        self._lock.release()
