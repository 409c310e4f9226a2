"""`train.threads` on the cores this process may use: torch's CPU threads, clamped (with one warning) where the
threads of every rank on this node would outnumber the cores. Oversubscribed, torch's thread pools spin against each
other and a step takes many times longer (2 threads x 2 ranks on 2 cores), so fewer threads are faster there.

- The cores are the process's CPU affinity where the OS gives it (a container's or job's cpuset), else os.cpu_count();
  the ranks on this node are torchrun's LOCAL_WORLD_SIZE (1 alone).
- Only an explicit `train.threads` is clamped: 0 keeps torch's default, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mhc_train.io.log import get_logger

logger = get_logger(__name__)
_warned: set[tuple[int, int, int]] = set()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where known, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_threads(requested: int, environ: Mapping[str, str] = os.environ) -> int:
    """The torch CPU threads to use for `train.threads=requested` (> 0): at most the cores per local rank, with one
    warning per process when that lowers it."""
    cores, ranks = usable_cores(), max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    fit = max(1, cores // ranks)
    if requested <= fit:
        return requested
    if (requested, cores, ranks) not in _warned:
        _warned.add((requested, cores, ranks))
        logger.warning(
            f"train.threads={requested} x {ranks} rank(s) on this node oversubscribes its {cores} usable core(s): "
            f"using {fit} thread(s) per rank (set train.threads={fit} to silence this)"
        )
    return fit
