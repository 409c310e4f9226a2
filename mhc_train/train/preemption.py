"""Graceful preemption: SIGTERM (what SLURM and Kubernetes send before they kill) and SIGINT (Ctrl-C) ask the run to
finish its step, write a checkpoint and stop (the trainer's `_preempt`); a second signal exits at once.

Launchers often deliver one stop twice (the deepspeed launcher: the terminal's SIGINT, then its own SIGTERM; SLURM
signals every process and torchrun forwards another): a repeat within REPEAT_GRACE_S is the same stop. Signals reach
only the main thread, so elsewhere the handlers are left as they are.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

REPEAT_GRACE_S = 3.0


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
