"""`python -m tests.checkpoint.resume_probe <overrides...>` (under torchrun: `launch.torchrun_cmd(..., module=MODULE)`):
`mhc_train.train`, recording which checkpoint files each rank digests and opens while it resumes (choosing the resume
point and restoring the engine). Patched in from the test side like `tests.support.read_probe`; at exit each rank
writes `$MHC_RESUME_PROBE/resume_rank<RANK>.json`: a list of {"path", "bytes", "how"}."""

from __future__ import annotations

import atexit
import builtins
import io
import json
import os
import sys
from pathlib import Path

MODULE = "tests.checkpoint.resume_probe"
ENV = "MHC_RESUME_PROBE"


def reads(out_dir: Path) -> dict[int, list[dict]]:
    return {int(f.stem.removeprefix("resume_rank")): json.loads(f.read_text()) for f in out_dir.glob("resume_rank*")}


def install(out_dir: Path, rank: int) -> None:
    from mhc_train.checkpoint import integrity
    from mhc_train.train.checkpointer import Checkpointer

    records: list[dict] = []
    on = [False]
    digest, real_open = integrity.digest, builtins.open

    def recording_digest(path, limit=None):
        if on[0]:
            records.append({"path": str(path), "bytes": Path(path).stat().st_size if limit is None else limit,
                            "how": "digest"})  # fmt: skip
        return digest(path, limit)

    def recording_open(file, mode="r", *args, **kwargs):
        if on[0] and isinstance(file, (str, os.PathLike)) and not any(c in mode for c in "wax+"):
            records.append({"path": str(file), "bytes": Path(file).stat().st_size, "how": "open"})
        return real_open(file, mode, *args, **kwargs)

    def recorded(method):
        def wrapper(self, *args, **kwargs):
            on[0] = True
            try:
                return method(self, *args, **kwargs)
            finally:
                on[0] = False

        return wrapper

    integrity.digest = recording_digest
    Checkpointer.resume_point = recorded(Checkpointer.resume_point)
    Checkpointer.restore = recorded(Checkpointer.restore)
    builtins.open = io.open = recording_open
    out_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: (out_dir / f"resume_rank{rank}.json").write_text(json.dumps(records)))


def main() -> None:
    install(Path(os.environ[ENV]), int(os.environ.get("RANK", "0")))
    from mhc_train.cli import main as cli

    cli(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
