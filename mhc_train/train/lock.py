"""One owner per run directory: an advisory `flock` held for the life of a run by every rank that writes.

The kernel drops a flock when its process dies, however it dies, so the lock of a killed run is simply free again:
a new launch takes it over (and overwrites the holder record) without any staleness heuristic. A second live launch
fails at once, naming the PID and host in the holder record.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path

from mhc_train.train.errors import RunDirBusy


class RunLock:
    def __init__(self, path: Path, run_dir: Path):
        self.path, self.run_dir, self._fd = Path(path), Path(run_dir), None
        self._finalizer = None

    @property
    def released(self) -> bool:
        return self._fd is None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run_dir {self.run_dir} is in use by PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}, lock {self.path}); wait for that run to end or stop it, or "
                "give this run another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # a lock object dropped unreleased frees its flock
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._finalizer()  # closes the fd, once
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
