"""Graceful preemption: SIGTERM (what SLURM and Kubernetes send before they kill) and SIGINT (Ctrl-C) ask the run to
finish its step, write a checkpoint and stop (`Preemption.stop`); a second signal exits at once.

Launchers often deliver one stop twice (the deepspeed launcher: the terminal's SIGINT, then its own SIGTERM; SLURM
signals every process and torchrun forwards another): a repeat within REPEAT_GRACE_S is the same stop. Signals reach
only the main thread, so elsewhere the handlers are left as they are.

`Preemption` is the loop's policy: every step it reads whether any rank received a stop (one flag, read together
with the loss), so every rank stops after the same step, and `stop` ends the run naming the checkpoint written. An
asynchronous save still in flight is finished (`settle`, the checkpointer's `wait`) before the run says it stopped:
the checkpoint it names is committed.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from mhc_train.parallel import DistInfo, any_rank_flag
from mhc_train.train.errors import Preempted

REPEAT_GRACE_S = 3.0


def relaunch_command(argv: list[str]) -> str:
    """The command line that started this process, as the user can type it again: `mhc-train train ...` from the
    console script, `python -m mhc_train.cli train ...` and `python -m mhc_train.train ...` from the modules (whose
    argv holds the subcommand, or not)."""
    prog = Path(argv[0]).name if argv else ""
    if prog in ("mhc-train", "cli.py"):  # argv[1] is the subcommand
        head = ["mhc-train"] if prog == "mhc-train" else ["python", "-m", "mhc_train.cli"]
    else:  # mhc_train/train/__main__.py: the overrides only
        head = ["python", "-m", "mhc_train.train"]
    return " ".join(shlex.quote(a) for a in [*head, *argv[1:]])


class StopSignals:
    """`with StopSignals(current_step): ...` installs the handlers and restores the previous ones on exit;
    `received` is the first signal number (None until one arrives)."""

    def __init__(self, current_step: Callable[[], int]):
        self.current_step, self.received, self._at, self._old = current_step, None, 0.0, {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._at < REPEAT_GRACE_S:
                return  # the same stop delivered twice: keep finishing the step and checkpointing
            print(f"\n{name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received, self._at = signum, time.monotonic()
        print(
            f"\n{name}: finishing step {self.current_step()}, then writing a checkpoint (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class Preemption:
    """`with Preemption(dist, current_step):` installs the stop handlers for the run; `flag()` is the step's
    any-rank stop flag (a device scalar nobody has read yet: a collective), `stop` raises `Preempted`."""

    def __init__(self, dist: DistInfo, current_step: Callable[[], int], settle: Callable[[], Path | None] = None):
        self.dist, self.signals, self.settle = dist, StopSignals(current_step), settle

    def __enter__(self) -> Preemption:
        self.signals.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.signals.__exit__(*exc)

    def flag(self) -> torch.Tensor:
        return any_rank_flag(self.signals.received is not None, self.dist)

    def stop(self, step: int, checkpoint: Path) -> NoReturn:
        """Every rank, after writing `checkpoint`: stop with the signal's exit code (128 + its number)."""
        if self.settle is not None:  # an asynchronous save in flight: committed (or its error raised) first
            checkpoint = self.settle() or checkpoint
        signum = self.signals.received or signal.SIGTERM
        how = "the same torchrun command" if self.dist.world > 1 else relaunch_command(sys.argv)
        raise Preempted(
            f"{signal.Signals(signum).name} at step {step}: wrote checkpoint {checkpoint}. To resume, relaunch {how} "
            "(checkpoint.resume=auto continues from it)",
            128 + signum,
        )
