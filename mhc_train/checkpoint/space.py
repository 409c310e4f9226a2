"""Disk full while checkpointing: what a save needs, how much is free, and the one-line error that says both.

A save that runs out of space (ENOSPC, or EDQUOT on a quota) removes what it had written of the new checkpoint and
raises `CheckpointError` naming the path, the space the checkpoint needs and the space free. Nothing older is touched:
retention runs only after a new checkpoint is written and verified, so the previous checkpoint stays the resume point.
The space needed is the state's tensor bytes plus the digest footer (the pickle's own overhead is small beside them).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from mhc_train.checkpoint.errors import CheckpointError
from mhc_train.checkpoint.integrity import FOOTER

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def no_space_cause(e: BaseException) -> OSError | None:
    """The disk-full OSError behind `e`: `e` itself, or the one a rank raised inside DCP's save (torch gives every
    rank a CheckpointException whose `failures` map each failed rank to its exception); None if there is none."""
    if is_no_space(e):
        return e
    for failure in (getattr(e, "failures", None) or {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if is_no_space(cause):
            return cause
    return None


def state_nbytes(obj) -> int:
    """The bytes of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent); None if it cannot be read."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def no_space_error(path: Path, needed: int | None, cause: OSError) -> CheckpointError:
    """The one line for a checkpoint `path` that did not fit: the space it needs and the space free."""
    free = free_bytes(path.parent)
    need = f"it needs about {_mib(needed)}" if needed else "it needs more space"
    have = f", {_mib(free)} are free there" if free is not None else ""
    return CheckpointError(
        f"no space left on the device for checkpoint {path} ({cause.strerror or cause}): {need}{have}. The partial "
        "file was removed and the earlier checkpoints are intact; free space there (or lower checkpoint.keep_last) "
        "and relaunch with checkpoint.resume=auto"
    )


def needed_for_state(state: dict) -> int:
    return state_nbytes(state) + FOOTER
