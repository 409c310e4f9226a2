"""The run directory is one directory for every rank: checked at start, refused with one line when it is not.

Resume has every rank open rank 0's step file, and the checkpoints, metrics and locks of a run live in one place; a
`run_dir` on node-local disk (each node's own `/tmp/run`, `/scratch`) would train, then fail at the first resume. So
before anything is written there, rank 0 writes a marker file holding a fresh nonce, every rank reads it back, and the
ranks exchange what they saw (`exchange_without_deadline`, the process group's store): a rank that cannot read it
makes every rank raise the same `TrainingError`, naming the directory, the hosts that do not see it, and the fix.

Notable choices: the marker's name is new each launch (`.shared-check-<nonce>`), so no stale or cached entry can
answer for it; a reader retries for a few seconds (a network filesystem may publish a new file to other clients a
moment late); rank 0 removes the marker once every rank has answered. One process checks nothing.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path

from mhc_train.parallel import DistInfo, broadcast_from_main, exchange_without_deadline
from mhc_train.train.errors import TrainingError

READ_PATIENCE_S = 5.0  # how long a rank looks for the marker before it concludes that it cannot see it


def _read(marker: Path, nonce: str, patience_s: float) -> bool:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if marker.read_text() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _write_marker(root: Path) -> tuple[str, str | None]:
    """Rank 0: (the nonce, None) once the marker is written, or ("", why it could not be)."""
    nonce = secrets.token_hex(8)
    try:
        (root / f".shared-check-{nonce}").write_text(nonce)
    except OSError as e:
        return "", f"rank 0 cannot write to run_dir {root} ({e}); point run_dir at a writable directory"
    return nonce, None


def check_shared_run_dir(root: Path, dist: DistInfo, patience_s: float = READ_PATIENCE_S) -> None:
    """Raise TrainingError on every rank unless every rank sees the files rank 0 writes in `root` (a collective)."""
    if dist.world == 1:
        return
    root = Path(root)
    nonce, error = broadcast_from_main(_write_marker(root) if dist.is_main else None, dist)  # after the write
    if error is not None:
        raise TrainingError(error)
    marker = root / f".shared-check-{nonce}"
    seen = _read(marker, nonce, patience_s)
    answers = [json.loads(a) for a in exchange_without_deadline(json.dumps([seen, socket.gethostname()]), dist)]
    if dist.is_main:
        marker.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(answers) if not ok]
    if blind:
        who = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise TrainingError(
            f"run_dir {root} is not shared across nodes: {who} cannot read {marker.name}, which rank 0 on "
            f"{answers[0][1]} wrote there. Every rank opens rank 0's checkpoints on resume: put run_dir on a "
            "filesystem every node mounts (NFS, Lustre, GPFS), the same path on each node"
        )
