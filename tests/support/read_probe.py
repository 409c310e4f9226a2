"""`python -m tests.support.read_probe <overrides...>` (under torchrun: `launch.torchrun(..., module=MODULE,
env=probe_env(dir, when))`): `mhc_train.train`, recording which files each rank reads while it saves a checkpoint
(`when="save"`) or while it resumes from one (`when="resume"`: choosing the resume point and restoring the engine).

The probe is patched in from the test side (the product has no seam for it): while one of the methods of `WHEN[when]`
runs, every digest (`mhc_train.checkpoint.integrity.digest`, the one place checkpoint bytes are hashed) and every file
opened for reading through `open` / `io.open` is recorded with its byte count. At exit each rank writes
`$MHC_READ_PROBE/<when>_rank<RANK>.json`: a list of {"path", "bytes", "how"}. `reads(out_dir, when)` reads them back.
"""

from __future__ import annotations

import atexit
import builtins
import importlib
import io
import json
import os
import sys
from pathlib import Path

MODULE = "tests.support.read_probe"
ENV = "MHC_READ_PROBE"  # the directory the ranks write their records to
WHEN_ENV = "MHC_READ_PROBE_WHEN"  # a key of WHEN
WHEN = {  # what is recorded: the reads made inside these methods ("module:Class.method")
    "save": ("mhc_train.checkpoint.manager:CheckpointManager.save",),
    "resume": (
        "mhc_train.train.checkpointer:Checkpointer.resume_point",
        "mhc_train.train.checkpointer:Checkpointer.restore",
    ),
}


def probe_env(out_dir: Path, when: str = "save") -> dict:
    """The environment a probed launch needs (`launch.run(cmd, **probe_env(...))`)."""
    return {ENV: str(out_dir), WHEN_ENV: when}


def reads(out_dir: Path, when: str = "save") -> dict[int, list[dict]]:
    """{rank: the reads it recorded} of a probed run."""
    prefix = f"{when}_rank"
    return {int(f.stem.removeprefix(prefix)): json.loads(f.read_text()) for f in out_dir.glob(f"{prefix}*.json")}


def _method(spec: str):
    module, qualname = spec.split(":")
    owner_name, name = qualname.split(".")
    return getattr(importlib.import_module(module), owner_name), name


def install(out_dir: Path, rank: int, when: str = "save") -> None:
    """Patch the digest, `open` and the methods of `WHEN[when]` in this process to record reads while they run."""
    from mhc_train.checkpoint import integrity

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

    for spec in WHEN[when]:
        owner, name = _method(spec)
        setattr(owner, name, recorded(getattr(owner, name)))
    integrity.digest = recording_digest
    builtins.open = io.open = recording_open  # pathlib opens through io.open
    out_dir.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: (out_dir / f"{when}_rank{rank}.json").write_text(json.dumps(records)))


def main() -> None:
    install(Path(os.environ[ENV]), int(os.environ.get("RANK", "0")), os.environ.get(WHEN_ENV, "save"))
    from mhc_train.cli import main as cli

    cli(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
