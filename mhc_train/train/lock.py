"""One owner per run directory: an advisory `flock` held for the life of a run by every rank that writes.

The lock is `mhc_train.io.lock.FileLock` (flock, or an O_EXCL marker where flock does not work): the lock of a
killed run is free again, and a new launch takes it over (and overwrites the holder record). A second live launch
fails at once, naming the PID and host in the holder record. `claim_run_dir` is the trainer's entry: it also
refuses (or, asked to, moves aside) another run in the directory before a fresh start, and refuses a directory that
is not shared across nodes (shared_dir.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mhc_train.config import CheckpointConfig
from mhc_train.io.lock import FileLock
from mhc_train.io.log import get_logger
from mhc_train.io.rundir import RunDir
from mhc_train.parallel import DistInfo, any_rank, broadcast_from_main
from mhc_train.train.errors import RunDirBusy, TrainingError
from mhc_train.train.shared_dir import check_shared_run_dir

logger = get_logger(__name__)


class RunLock:
    """One rank's lock on a run directory (`mhc_train.io.lock.FileLock`); a second live owner is refused."""

    def __init__(self, path: Path, run_dir: Path):
        self.path, self.run_dir = Path(path), Path(run_dir)
        self._lock = FileLock(self.path)

    @property
    def released(self) -> bool:
        return not self._lock.held

    def acquire(self) -> RunLock:
        if not self._lock.try_acquire():
            holder = self._lock.holder()
            self._lock.release()
            raise RunDirBusy(
                f"run_dir {self.run_dir} is in use by PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('since', '?')}, {self._lock.describe()}); wait for that run to end or stop it, or "
                "give this run another run_dir"
            ) from None
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_a_run(run_dir: RunDir) -> str:
    """What of an earlier run the run directory holds ("" for nothing)."""
    steps = run_dir.step_files()
    if steps:
        return f"{len(steps)} checkpoint(s), the newest {steps[-1][1].name}"
    metrics = run_dir.metrics
    return f"{metrics} ({metrics.stat().st_size} bytes)" if metrics.is_file() and metrics.stat().st_size else ""


def claim_run_dir(run_dir: RunDir, ck: CheckpointConfig, dist: DistInfo) -> RunLock:
    """Create the run directory and take this rank's lock on it. A fresh start (checkpoint.resume=never) in a
    directory that holds another run refuses, or with checkpoint.overwrite=true moves that run aside. Rank 0
    decides and every rank follows; a rank that cannot take its lock stops every rank."""
    root = run_dir.root
    error = None
    if dist.is_main:
        try:
            held = holds_a_run(run_dir) if ck.resume == "never" else ""
            if held and not ck.overwrite:
                raise TrainingError(
                    f"run_dir {root} already holds a run ({held}) and checkpoint.resume=never starts a new one: "
                    "use another run_dir, or set checkpoint.overwrite=true to move the old run aside (nothing is "
                    "deleted)"
                )
            if held:
                aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                old = RunLock(run_dir.lock(0), root).acquire()  # refuses while that run is live
                os.replace(root, aside)
                old.release()
                logger.info(f"checkpoint.overwrite=true: moved the old run in {root} aside to {aside}")
        except Exception as e:
            error = e
    error = broadcast_from_main(error, dist)
    if error is not None:
        raise error
    run_dir.create()
    check_shared_run_dir(root, dist)  # every rank must see rank 0's files (resume opens its step file)
    lock, failed = RunLock(run_dir.lock(dist.rank), root), None
    try:
        lock.acquire()
    except RunDirBusy as e:
        failed = e
    if any_rank(failed is not None, dist):
        lock.release()
        raise failed or RunDirBusy(f"another rank could not take its lock on run_dir {root}; see its message")
    return lock
