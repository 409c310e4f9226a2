"""Reading a finished (or running) run directory in tests: its train and validation losses, its checkpointed weights,
copying a checkpoint into another run directory, and waiting for a background run to log a step."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mhc_train.checkpoint import read_model_state
from mhc_train.train.metrics import read_metrics


def losses(run_dir, kind: str = "train") -> list[float]:
    """The logged losses of `kind` ("train" or "val") in step order."""
    return [r["loss"] for r in read_metrics(run_dir)[kind]]


def losses_by_step(run_dir, kind: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)[kind]}


def weights(run_dir, step: int) -> dict:
    """The model state of the checkpoint of `step`."""
    return read_model_state(Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt")


def copy_checkpoint(src_run: Path, dst_run: Path, step: int) -> None:
    """A checkpoint file and the sharded directory it points at (DCP or DeepSpeed), into another run directory."""
    name = f"step_{step:08d}"
    (dst_run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(src_run / "checkpoints" / f"{name}.pt", dst_run / "checkpoints" / f"{name}.pt")
    for sharded in ("dcp", "deepspeed"):
        if (src_run / "checkpoints" / sharded / name).is_dir():
            shutil.copytree(src_run / "checkpoints" / sharded / name, dst_run / "checkpoints" / sharded / name)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    """Until the background run `proc` has logged train step `step` (fails if it exits first or time runs out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and f'"kind": "train", "step": {step},' in metrics.read_text():
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the run never reached step {step}")
