"""`python -m tests.support.read_probe <overrides...>` (under torchrun: `launch.torchrun_cmd(..., module=MODULE)`):
`mhc_train.train`, recording which files each rank reads while it saves a checkpoint.

The probe is patched in from the test side (the product has no seam for it): while `CheckpointManager.save` runs,
every digest (`mhc_train.checkpoint.integrity.digest`, the one place checkpoint bytes are hashed) and every file
opened for reading through `open` / `io.open` is recorded with its byte count. At exit each rank writes
`$MHC_READ_PROBE/reads_rank<RANK>.json`: a list of {"path", "bytes", "how"}. `reads(out_dir)` reads them back.
"""

from __future__ import annotations

import atexit
import builtins
import io
import json
import os
import sys
from pathlib import Path

MODULE = "tests.support.read_probe"
ENV = "MHC_READ_PROBE"


def reads(out_dir: Path) -> dict[int, list[dict]]:
    """{rank: the reads it recorded during checkpoint saves} of a probed run."""
    return {int(f.stem.removeprefix("reads_rank")): json.loads(f.read_text()) for f in out_dir.glob("reads_rank*.json")}


def install(out_dir: Path, rank: int) -> None:
    """Patch the digest, `open` and the manager's save of this process to record reads during saves."""
    from mhc_train.checkpoint import integrity
    from mhc_train.checkpoint.manager import CheckpointManager

    records: list[dict] = []
    saving = [False]
    digest, real_open, save = integrity.digest, builtins.open, CheckpointManager.save

    def recording_digest(path, limit=None):
        if saving[0]:
            records.append({"path": str(path), "bytes": Path(path).stat().st_size if limit is None else limit,
                            "how": "digest"})  # fmt: skip
        return digest(path, limit)

    def recording_open(file, mode="r", *args, **kwargs):
        if saving[0] and isinstance(file, (str, os.PathLike)) and not any(c in mode for c in "wax+"):
            records.append({"path": str(file), "bytes": Path(file).stat().st_size, "how": "open"})
        return real_open(file, mode, *args, **kwargs)

    def recording_save(self, *args, **kwargs):
        saving[0] = True
        try:
            return save(self, *args, **kwargs)
        finally:
            saving[0] = False

    integrity.digest, CheckpointManager.save = recording_digest, recording_save
    builtins.open = io.open = recording_open  # pathlib opens through io.open
    out_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: (out_dir / f"reads_rank{rank}.json").write_text(json.dumps(records)))


def main() -> None:
    install(Path(os.environ[ENV]), int(os.environ.get("RANK", "0")))
    from mhc_train.cli import main as cli

    cli(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
