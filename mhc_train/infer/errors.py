"""Errors of inference: a checkpoint, tokenizer, prompt or task that cannot be used."""

from __future__ import annotations

from mhc_train.errors import MhcTrainError


class InferenceError(MhcTrainError, RuntimeError):
    """A checkpoint, tokenizer, prompt or task cannot be used for inference; the message names it and the fix."""
