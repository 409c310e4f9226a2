"""The checkpoint errors: each message names the file and the fix."""

from __future__ import annotations

from mhc_train.errors import MhcTrainError


class CheckpointError(MhcTrainError, RuntimeError):
    """A checkpoint is corrupt, missing or does not match the run; the message names the file and the fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's bytes do not match the digests written with it (never loaded; auto-resume moves it aside)."""


class UnverifiableCheckpoint(CheckpointError):
    """A step file without a digest footer (older than digests, or cut at the end): refused, not moved aside."""
