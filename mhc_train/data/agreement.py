"""Every rank prepares its data, then all ranks agree that they hold the same data before training starts.

- Each rank calls `prepare` itself: on each filesystem the first one builds (or reuses) the data under the prepare lock
  while the others wait on that lock (logging progress); no rank sits in a collective meanwhile.
- The agreement is one exchange of a small JSON value per rank (the data key and a digest of the shard list, or the
  rank's error). The exchange is passed in (`exchange(value) -> every rank's value, in rank order`), so this module
  needs nothing from `mhc_train.parallel`; the trainer passes one without a deadline, since a rank may still be
  building for hours.
- A rank's own error is raised as it is; another rank's error, or different data on two ranks, is a `DataError`
  naming the ranks and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from mhc_train.config import DataConfig
from mhc_train.data.build import prepare
from mhc_train.data.errors import DataError


def shards_digest(manifest: dict) -> str:
    """One digest of a manifest's shard list (names, token counts, sha256), to compare across nodes."""
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]


def prepare_agreed(cfg: DataConfig, rank: int, exchange: Callable[[str], list[str]]) -> dict:
    """`prepare(cfg)` on this rank, then check that every rank ended with the same data; returns this rank's manifest.

    Args:
        cfg: the data settings (the same on every rank).
        rank: this rank's number (for the messages).
        exchange: every rank's string value, in rank order, for this rank's value (called once, on every rank).
    """
    manifest, error = None, None
    try:
        manifest = prepare(cfg)
        mine = json.dumps({"key": manifest["key"], "shards": shards_digest(manifest)})
    except DataError as e:
        mine, error = json.dumps({"error": str(e)}), e
    everyone = [json.loads(v) for v in exchange(mine)]
    if error is not None:
        raise error
    if (failed := next((r for r, v in enumerate(everyone) if "error" in v), None)) is not None:
        raise DataError(f"rank {failed} could not prepare its data: {everyone[failed]['error']}")
    if any(v != everyone[0] for v in everyone):
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        raise DataError(
            f"rank(s) {differ} prepared other data than rank 0 (rank {rank} has {manifest['dir']}, key "
            f"{manifest['key']}; rank 0 has key {everyone[0]['key']}): every node must see the same data.source "
            "and data.* settings; run `mhc-train prepare` once on each node (or on a shared filesystem) before "
            "the launch"
        )
    return manifest
