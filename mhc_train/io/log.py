"""One module logger for the whole package, and structured progress records.

- Every module logs through `get_logger(__name__)`: children of the `mhc_train` logger, so one handler installed at
  start-up (`setup_logging`) decides where lines go. `ensure_logging(rank)` installs it only where nobody configured
  the package logger (the Python entry `mhc_train.train.trainer.train` calls it, so a script sees what the CLI shows).
- On multi-rank runs `setup_logging(rank)` installs a `RankFilter`: rank 0 prints, other ranks print only records
  logged with `extra={"all_ranks": True}` (a rank waiting on another, a rank's own failure).
- Progress is a record, not a wording: `progress(logger, kind, message, **fields)` logs `message` and attaches
  `record.progress = {"kind": kind, **fields}`, so a consumer (a monitoring handler, a test) reads the fields instead
  of parsing the text; `all_ranks=True` is what makes a line show on every rank (no wording contract). Kinds in use are listed where they are emitted (e.g. `mhc_train.data`).
"""

from __future__ import annotations

import logging
import sys

ROOT = "mhc_train"


def get_logger(name: str | None = None) -> logging.Logger:
    """The package logger, or its child for module `name` (`get_logger(__name__)`)."""
    if not name or name == ROOT:
        return logging.getLogger(ROOT)
    return logging.getLogger(name if name.startswith(ROOT + ".") else f"{ROOT}.{name}")


class RankFilter(logging.Filter):
    """Pass every record on rank 0; on other ranks only those logged with `extra={"all_ranks": True}`."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or bool(getattr(record, "all_ranks", False))


_HANDLER_FLAG = "_mhc_train_handler"


def setup_logging(rank: int = 0, stream=None, level: int = logging.INFO) -> logging.Handler:
    """Install (or replace) the package's one console handler: plain message lines on `stream` (stdout by default),
    filtered by rank (other ranks' lines start with `rank N: `). Idempotent: calling it again replaces the handler instead of adding a second."""
    root = get_logger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_FLAG, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"rank {rank}: %(message)s"))
    handler.addFilter(RankFilter(rank))
    setattr(handler, _HANDLER_FLAG, True)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler


def progress(logger: logging.Logger, kind: str, message: str, *, all_ranks: bool = False, **fields) -> None:
    """Log `message` at INFO with a structured `record.progress = {"kind": kind, **fields}`."""
    logger.info(message, extra={"progress": {"kind": kind, **fields}, "all_ranks": all_ranks})


def ensure_logging(rank: int = 0) -> None:
    """`setup_logging(rank)` unless the package logger already has a handler (the CLI's, or the user's own)."""
    if not get_logger().handlers:
        setup_logging(rank)
