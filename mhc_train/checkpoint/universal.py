"""DeepSpeed's universal checkpoint: resuming a ZeRO checkpoint at another world size.

DeepSpeed's native ZeRO checkpoint holds one optimizer partition per data-parallel rank, laid out for the world size
that wrote it. Its offline converter (`deepspeed.checkpoint.ds_to_universal`) rewrites those partitions as one file
per parameter and state (fp32 weight, Adam moments, step), which the engine reads back at any world size when its
config says `checkpoint.load_universal` (`DeepSpeedEngine.load_universal`).

Notable choices:
- Converted once, kept next to the checkpoint: `checkpoints/deepspeed/<tag>/universal/`, inside the tag's own
  directory, so retention and moving a damaged checkpoint aside take it along, and a second resume at another world
  size reuses it. The conversion writes `universal.partial/` and renames it when complete: a crash mid-way leaves no
  directory that looks finished (the next resume discards the partial one and converts again).
- Rank 0 converts; the other ranks wait. `ds_to_universal.main` converts a whole checkpoint in one call (it offers
  no per-rank share of the parameters, and every share would have to read every partition file anyway), so splitting
  it across ranks would have them all read the same files. The wait is on the process group's key-value store
  (`parallel.dist.exchange_without_deadline`), not in a collective: converting a 7B checkpoint takes minutes, longer
  than `parallel.timeout_s` may allow a barrier. Rank 0's outcome (an error message or nothing) travels the same way,
  so a failed conversion stops every rank with the same one line.
- One process, no worker pool (`num_*_workers=1`): DeepSpeed's pool forks from a process that holds a process group
  and threads; the conversion is I/O-bound on a shared filesystem anyway. Its progress output is swallowed.
- The source shards are verified before this runs (resume verifies the step file's listed shards); the converted
  directory is DeepSpeed's own derived data, trusted as complete because of the rename.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from mhc_train.checkpoint.errors import CheckpointError
from mhc_train.parallel.dist import DistInfo, exchange_without_deadline

NAME = "universal"


def universal_dir(sharded: Path) -> Path:
    """Where the universal form of the DeepSpeed checkpoint directory `sharded` lives."""
    return sharded / NAME


def convert(sharded: Path) -> Path:
    """Convert DeepSpeed's ZeRO checkpoint in `sharded` to the universal form (one process; no process group);
    returns its directory. Reuses a finished conversion."""
    out = universal_dir(sharded)
    if out.is_dir():
        return out
    partial = sharded / f"{NAME}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(sharded), output_folder=str(partial), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal.main(args)
    (sharded / "latest_universal").unlink(missing_ok=True)  # it names `universal.partial`; we pass the tag instead
    partial.rename(out)
    return out


def ensure_universal(sharded: Path, dist: DistInfo) -> Path:
    """Every rank: the universal form of `sharded`, converted by rank 0 while the others wait without a deadline;
    raises CheckpointError on every rank if the conversion failed."""
    failure = ""
    if dist.is_main:
        try:
            convert(sharded)
        except Exception as e:  # noqa: BLE001 - any failure of DeepSpeed's converter is reported to every rank
            failure = f"{type(e).__name__}: {str(e)[:300]}".replace("\n", " ")
    failure = exchange_without_deadline(failure, dist)[0]
    if failure:
        raise CheckpointError(
            f"cannot convert the DeepSpeed checkpoint {sharded} to DeepSpeed's universal form for a resume at "
            f"another world size ({failure}); relaunch with the world size that wrote it"
        )
    return universal_dir(sharded)
