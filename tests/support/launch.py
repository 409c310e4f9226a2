"""Launching runs from tests: the environment every child gets, the commands (`python -m mhc_train.train`, the CLI,
torchrun on a fresh port), a blocking run that fails with the output's tail, a background launch, and the cache of
one-process reference runs the distributed tests share (`ReferenceRuns`, behind conftest's `reference_runs`).

Notable choices: one OMP thread and PYTHONHASHSEED=0 in every child (the ranks of a 2-core machine must not fight
over threads); torchrun ports count up from a per-process base, so serial launches never reuse a port in TIME_WAIT.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Each pytest-xdist worker (`make test` runs two) counts in its own range of 2000 ports, so that two workers'
# concurrent launches never pick the same port; the pid spreads successive sessions within it.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_PORTS = itertools.count(20000 + 2000 * (_WORKER % 20) + os.getpid() % 1000)


def env(**extra: str) -> dict:
    """The environment of a child process: this one's, plus a fixed hash seed, one OMP thread, and the repository's
    torch extension cache."""
    return {
        **os.environ,
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"),
        **extra,
    }


def train_cmd(overrides) -> list[str]:
    """One process: `python -m mhc_train.train <overrides>`."""
    return [sys.executable, "-m", "mhc_train.train", *overrides]


def cli_cmd(*args) -> list[str]:
    """The user's entry point: `python -m mhc_train.cli <args>` (e.g. `"train", *overrides`)."""
    return [sys.executable, "-m", "mhc_train.cli", *args]


def torchrun_cmd(overrides, nproc: int = 2, module: str = "mhc_train.train") -> list[str]:
    """`torchrun --nproc_per_node=<nproc>` of `module` on a port no earlier launch of this session used."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={next(_PORTS)}",
        "-m",
        module,
        *overrides,
    ]


def torchrun(data_dir, run_dir, nproc: int = 2, module: str = "mhc_train.train", timeout: float = 600,
             env: dict | None = None, **overrides) -> str:  # fmt: skip
    """The multi-rank tests' launch: `module` under torchrun on `nproc` ranks, on a seconds-long run of `overrides`
    (`configs.run_overrides`: the test model and the prepared data, in `run_dir`), to the end (see `run`), with
    `env` added to the child's environment (a probe's settings); stdout + stderr."""
    from tests.support.configs import run_overrides

    cmd = torchrun_cmd(run_overrides(data_dir, run_dir, **overrides), nproc=nproc, module=module)
    return run(cmd, timeout=timeout, **(env or {}))


def run(cmd, timeout: float = 300, **env_extra: str) -> str:
    """Run to the end from the repository root; fail with the output's tail unless it exits 0; stdout + stderr."""
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def single(overrides, timeout: float = 300) -> str:
    """One training process to the end (see `run`)."""
    return run(train_cmd(overrides), timeout=timeout)


def launch(cmd, **env_extra: str) -> subprocess.Popen:
    """Start in the background from the repository root, stdout and stderr merged into one text pipe."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


class ReferenceRuns:
    """One-process reference runs, each trained once per session and shared by every test that compares against the
    same settings (the data directory and the overrides; the run directory is the cache's own)."""

    def __init__(self, data_dir: Path, make_dir):
        self.data_dir, self.make_dir, self.runs = data_dir, make_dir, {}

    def __call__(self, **overrides) -> Path:
        from tests.support.configs import run_overrides

        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in self.runs:
            run_dir = self.make_dir("reference")
            single(run_overrides(self.data_dir, run_dir, **overrides))
            self.runs[key] = run_dir
        return self.runs[key]
