"""Capturing the package's log records in a test: `with collect_progress() as c: ...; c.records, c.messages`."""

from __future__ import annotations

import logging

from mhc_train.io.log import get_logger


class ProgressCollector(logging.Handler):
    """A handler that keeps the `progress` dicts (and messages) it sees: `with collect_progress() as c: ...`."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[dict] = []
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if hasattr(record, "progress"):
            self.records.append(record.progress)


class collect_progress:
    """Context manager attaching a `ProgressCollector` to the package logger (level INFO while inside)."""

    def __enter__(self) -> ProgressCollector:
        self.root = get_logger()
        self.collector = ProgressCollector()
        self.level = self.root.level
        if self.root.level == logging.NOTSET or self.root.level > logging.INFO:
            self.root.setLevel(logging.INFO)
        self.root.addHandler(self.collector)
        return self.collector

    def __exit__(self, *exc) -> None:
        self.root.removeHandler(self.collector)
        self.root.setLevel(self.level)
