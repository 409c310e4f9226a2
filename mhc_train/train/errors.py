"""Errors the training loop reports to the user: each message names the problem, where, and the fix."""

from __future__ import annotations

from mhc_train.errors import MhcTrainError


class TrainingError(MhcTrainError, RuntimeError):
    """The run cannot go on (non-finite loss, a lost peer, ...); the message names the step, the last checkpoint and
    the fix."""


class RunDirBusy(TrainingError):
    """Another live process owns the run directory."""


class Preempted(TrainingError):
    """SIGTERM / SIGINT: the run wrote a checkpoint and stops; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
