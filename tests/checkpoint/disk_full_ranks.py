"""`torchrun --nproc_per_node=2 -m tests.checkpoint.disk_full_ranks DIR`: a save that runs out of disk on one rank, in
both places a multi-rank save writes: a DCP shard written by rank 1, and the step file written by rank 0. Each rank
saves step 1 (succeeds), then step 2 with the write failing on one rank, and appends one JSON line per case to
DIR/results_<rank>.jsonl: what it raised, how long the failing save took, and what is on disk afterwards. The engine is a stub holding one
tensor (the manager needs only its state); the ENOSPC is injected from here, the product has no seam for it."""

from __future__ import annotations

import errno
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from mhc_train.checkpoint import CheckpointManager, integrity
from mhc_train.config import CheckpointConfig
from mhc_train.parallel import init_distributed

TIMEOUT_S = 60  # parallel.timeout_s of this group: before the fix, the ranks that did not fail waited this long


class StubEngine:
    """What CheckpointManager.save reads of an engine, for one small tensor and no optimizer state."""

    name, checkpoint_formats = "stub", ("file", "dcp")

    def __init__(self):
        self.model = torch.nn.Linear(4, 4)
        self.optimizer = torch.optim.SGD([{"params": self.model.parameters(), "name": "all"}], lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def live_state(self) -> dict:
        return {"model": dict(self.model.state_dict())}

    def optimizer_state(self) -> dict:
        return {}

    def full_model(self) -> torch.nn.Module:
        return self.model


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def case(name: str, fmt: str, failing_rank: int, target, attribute: str, root: Path, info) -> None:
    manager = CheckpointManager(root / name, CheckpointConfig(format=fmt, keep_last=2), info)
    engine = StubEngine()
    manager.save(engine, 1, {"config": {}})
    original = getattr(target, attribute)
    if info.rank == failing_rank:
        setattr(target, attribute, no_space)
    t0 = time.monotonic()
    try:
        manager.save(engine, 2, {"config": {}})
        raised = None
    except BaseException as e:  # noqa: BLE001 (what was raised is the result)
        raised = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    seconds = time.monotonic() - t0
    setattr(target, attribute, original)
    steps = [s for s, _ in manager.complete()]
    partial = [str(d) for d in manager.run.sharded_dirs(manager.run.tag(2)) if d.exists()]
    record = {"case": name, "rank": info.rank, "raised": raised, "seconds": seconds, "steps": steps}
    with open(root / f"results_{info.rank}.jsonl", "a") as f:  # a file per rank: printed lines interleave
        f.write(json.dumps({**record, "partial": partial}) + "\n")
    # every rank stays alive until all have their result (a rank that exits releases a gloo peer stuck in a
    # collective at once, which a rank on another node would not): through the store, which no collective blocks
    store = torch.distributed.distributed_c10d._get_default_store()
    store.set(f"{name}/{info.rank}", "done")
    store.wait([f"{name}/{r}" for r in range(info.world)], timedelta(seconds=3 * TIMEOUT_S))


def main() -> None:
    root = Path(sys.argv[1])
    info = init_distributed("cpu", timeout_s=TIMEOUT_S)
    case("shard", "dcp", 1, dcp_filesystem._FileSystemWriter, "write_data", root, info)
    case("step_file", "file", 0, integrity, "append_footer", root, info)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
