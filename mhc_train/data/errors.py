"""Errors of the data layer: missing or inconsistent input data, shards, manifests or tokenizers."""

from __future__ import annotations

from mhc_train.errors import MhcTrainError


class DataError(MhcTrainError, RuntimeError):
    """Input data, shards, manifest or tokenizer are missing or inconsistent; the message names the fix."""


class SourceMissing(DataError):
    """`data.source` (a local path, or the bundled corpus package) is gone; prepared data may still be reusable."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name  # the source's name as a manifest records it (an absolute path, or "shakespeare")
