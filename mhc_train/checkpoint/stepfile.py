"""The step file `checkpoints/step_XXXXXXXX.pt`: written atomically with its digest footer, read back verified.

A step file is written as a hidden temporary file, fsynced, given its digest footer and renamed: a kill at any moment
leaves either the previous set of complete checkpoints or that set plus the new one, never a half-written file under
a checkpoint name. It is read `weights_only` (tensors and plain containers; no code runs from the file) while its
digest is checked in a background thread, and returned only if the digest matches.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mhc_train.checkpoint import integrity, space
from mhc_train.checkpoint.errors import CheckpointError, CorruptCheckpoint, UnverifiableCheckpoint
from mhc_train.checkpoint.formats import format_of
from mhc_train.io.files import fsync_dir


def write_step_file(tmp: Path, final: Path, state: dict) -> Path:
    """Write `state` to `tmp` with its digest footer, rename it to `final` (durably), and verify what landed. Disk
    full: `tmp` is removed and a CheckpointError names `final` and the space it needs (`space.py`)."""
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        integrity.append_footer(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a partial file behind
        if space.is_no_space(e):
            raise space.no_space_error(final, space.needed_for_state(state), e) from None
        raise
    os.replace(tmp, final)
    fsync_dir(final.parent)
    integrity.verify_file(final)  # what landed on disk is what we meant to write, before anything older goes
    return final


def load_step_file(path: str | Path, verify: bool = True, timings: dict | None = None, trusted: bool = False) -> dict:
    """A step file's state; with `verify`, its digest is checked in a background thread while torch.load parses
    it, and the state is returned only if the digest matches (CorruptCheckpoint otherwise). Parsing unverified
    bytes is safe: the load is `weights_only`. `timings` receives the verification's seconds and bytes. `trusted`
    (checkpoint.verify=false) unpickles in full, as files written before digests existed need (their numpy RNG
    state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; set checkpoint.resume=auto or to an existing file")

    def check() -> tuple[int, float]:
        t0 = time.perf_counter()
        return integrity.verify_file(path), time.perf_counter() - t0

    with ThreadPoolExecutor(1) as pool:
        verified = pool.submit(check) if verify else None
        try:
            state, failure = torch.load(path, map_location="cpu", weights_only=not trusted), None
        except Exception as e:
            state, failure = None, e
        if verified is not None:
            try:
                nbytes, seconds = verified.result()
            except UnverifiableCheckpoint:
                raise
            except CheckpointError as e:
                raise CorruptCheckpoint(str(e)) from None
            if timings is not None:
                timings.update(bytes=nbytes, seconds=seconds)
    if failure is not None:
        raise CorruptCheckpoint(
            f"checkpoint {path} is corrupt or unreadable ({type(failure).__name__}: {str(failure)[:300]}); resume "
            "from the previous one (checkpoint.resume=auto moves a damaged checkpoint aside), or set "
            "checkpoint.resume to another file"
        ) from failure
    missing = format_of(state).required - set(state)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}: it was not written by mhc-train")
    return state


def read_model_state(path: str | Path) -> dict:
    """The model weights of a checkpoint file, whatever its format ({name: full tensor}); needs no process group.
    For a DCP checkpoint the shards are read back into full tensors."""
    path = Path(path)
    state = load_step_file(path)
    return format_of(state).weights(state, path)
