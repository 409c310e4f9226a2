"""One lock primitive: an exclusive, non-blocking lock on a file, with a holder record (pid, host, since, ...) inside.

Both locks of mhc-train are built on `FileLock`: the run directory's (`mhc_train.train.lock`, held for a run's life
by every rank that writes) and data preparation's (`mhc_train.data.lock`, one builder per filesystem, the others wait).

Notable choices:
- `flock` first: the kernel drops it when its process dies, however it dies, so the lock of a killed process is simply
  free again, with no staleness heuristic.
- Where `flock` does not work (some network filesystems answer ENOLCK / EOPNOTSUPP), the lock is a marker file
  `<path>.excl` created with O_EXCL, holding the holder record. A marker left by a dead process on this host is taken
  over (its PID no longer runs); a marker of another host is honoured until that run removes it.
- The holder record is JSON, rewritten in place (`record`), so a waiting process can say who holds the lock and how
  far that holder has come.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path

NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock unsupported on this filesystem


def write_holder(fd: int, **extra) -> None:
    """Replace the holder record in an open lock file: pid, host, since, and `extra` (e.g. a build directory)."""
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


def _alive_here(holder: dict) -> bool:
    """Whether the holder may still run: another host's holder always may; on this host, its PID must exist."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive lock on `path` (created when missing): `try_acquire()` takes it or says it is held (`holder()`
    names by whom); `release()` frees it. A lock object dropped unreleased frees its lock (its fd is closed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.marker = self.path.with_name(self.path.name + ".excl")  # the O_EXCL fallback's lock file
        self._fd: int | None = None  # the open lock file (flock) or marker (O_EXCL)
        self._held = False
        self._excl = False
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        """Take the lock if it is free. Raises OSError where the lock file cannot be created (a read-only
        directory)."""
        if self._held:
            return True
        if self._fd is None and not self._excl:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._set_fd(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        if not self._excl:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._held = True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in NO_FLOCK:
                    raise
                self._close()
                self._excl = True
        if self._excl:
            return self._try_marker()
        self.record()
        return True

    def _try_marker(self) -> bool:
        try:
            fd = os.open(self.marker, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _alive_here(self.holder()):
                return False
            self.marker.unlink(missing_ok=True)  # a dead process's marker on this host: take it over
            return self._try_marker()
        self._set_fd(fd)
        self._held = True
        self.record()
        return True

    @property
    def uses_marker(self) -> bool:
        """Whether this lock is the O_EXCL marker (the filesystem refused flock)."""
        return self._excl

    def describe(self) -> str:
        """Which file holds the lock, and, for a marker, how to clear one a dead run on another host left behind."""
        if self._excl:
            return (f"marker {self.marker}: this filesystem has no flock, so a run killed on another host leaves it "
                    "behind; delete it once that run is gone")  # fmt: skip
        return f"lock {self.path}"

    def holder(self) -> dict:
        """Who holds the lock ({} when unknown)."""
        if self._excl:
            try:
                fd = os.open(self.marker, os.O_RDONLY)
            except OSError:
                return {}
            try:
                return read_holder(fd)
            finally:
                os.close(fd)
        return read_holder(self._fd) if self._fd is not None else {}

    def record(self, **extra) -> None:
        """Write the holder record (pid, host, since, and `extra`) into the lock file, while held."""
        if self._held:
            write_holder(self._fd, **extra)

    def release(self) -> None:
        if self._held and self._excl:
            self.marker.unlink(missing_ok=True)
        elif self._held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._held = False
        self._close()

    def _set_fd(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # closes the fd, once
        self._fd, self._finalizer = None, None
