"""The checkpoint part of `scripts/bench_scale.py` (issue 24): one rank of a torchrun launch that saves the same FSDP
engine's DCP checkpoint synchronously and asynchronously and records, per rank, the bytes it read and the time each
save kept the training loop waiting.

    python -m torch.distributed.run --nproc_per_node=2 -m scripts.bench_checkpoint_scale <overrides>

(`BENCH_CKPT_OUT` names the folder for the run directory and the per-rank results; bench_scale.py drives it.)

- The engine is built the way the trainer builds it (`builds_on_meta`, `build_engine`) and trained on synthetic tokens
  (`mhc_train.plan.measure.synthetic_batch`: no data is prepared); one warm-up step first, so AdamW's moments exist and
  the checkpoint holds weights and both moments.
- Reads are recorded the way `tests/support/read_probe.py` records them (the digest, the one place checkpoint bytes are
  hashed, and every `open` for reading), from the save's call until it is committed (for an async save: through the
  background write, the training steps that overlap it and the final `wait`), and only under the checkpoint folder.
  Each shard read is attributed to its writer (`Format.writer_of`): `own`, `other` (another rank's shard: rank 0 must
  read none), `metadata` (DCP's `.metadata`, rank 0's) and `step_file` (rank 0's read-back of the step file it wrote).
- Timings per save: `block_s`, the wall time the save call held the loop (the whole save when synchronous; staging
  and the write's start when asynchronous); for async saves also `background_s` (submission to this rank's commit,
  digests and step file included), `overlap_steps` training steps taken while it was in flight (`overlap_step_s`
  their mean, next to `step_s` of a step with nothing in flight) and `wait_s`, the rest waited for at `wait()`.
- Each mode saves `REPEATS` times; the first async save also creates the save's gloo group and the stager.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ENV = "BENCH_CKPT_OUT"
REPEATS = 2
OVERLAP_STEPS = 3


class ReadProbe:
    """Records (path, bytes, how) of digests and reads under `root` while `on`; patches this process."""

    def __init__(self, root: Path):
        from mhc_train.checkpoint import integrity

        self.root, self.on, self.records = str(root), False, []
        digest, real_open = integrity.digest, builtins.open

        def recording_digest(path, limit=None):
            self._record(path, Path(path).stat().st_size if limit is None else limit, "digest")
            return digest(path, limit)

        def recording_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and not any(c in mode for c in "wax+"):
                self._record(file, None, "open")
            return real_open(file, mode, *args, **kwargs)

        integrity.digest = recording_digest
        builtins.open = io.open = recording_open  # pathlib opens through io.open

    def _record(self, path, size, how) -> None:
        if self.on and str(path).startswith(self.root):
            self.records.append((str(path), Path(path).stat().st_size if size is None else size, how))

    def take(self) -> list[tuple[str, int, str]]:
        records, self.records = self.records, []
        return records


def classify(records, rank: int) -> dict:
    """Bytes read by kind: own / other rank's shards, DCP metadata, the step file (module docstring)."""
    from mhc_train.checkpoint.formats import FORMATS

    out = {"own": 0, "other": 0, "metadata": 0, "step_file": 0}
    for path, size, _ in records:
        name = Path(path).name
        if name.endswith(".distcp"):
            out["own" if FORMATS["dcp"].writer_of(name) == rank else "other"] += size
        else:
            out["metadata" if name == ".metadata" else "step_file"] += size
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Saves:
    """The saves of one rank: `engine` trained by `train_step`, reads recorded by `probe`, `barrier` before each."""

    def __init__(self, engine, train_step, probe: ReadProbe, rank: int, barrier):
        self.engine, self.train_step, self.probe, self.rank, self.barrier = engine, train_step, probe, rank, barrier
        self.step = 0

    def _save(self, manager) -> tuple[float, float]:
        """Train one step, then save it with `manager`: (when the save call started, the seconds it took)."""
        self.step += 1
        self.train_step()
        self.barrier()
        self.probe.on = True
        t0 = time.perf_counter()
        manager.save(self.engine, self.step, {"data": {"seed": 0, "next_step": self.step}})
        return t0, time.perf_counter() - t0

    def sync(self, manager) -> list[dict]:
        out = []
        for _ in range(REPEATS):
            _, block = self._save(manager)
            self.probe.on = False
            out.append({"step": self.step, "block_s": block, "read_bytes": classify(self.probe.take(), self.rank)})
        return out

    def asynchronous(self, manager) -> list[dict]:
        committed, commit = [], manager.commit

        def timed_commit(*args, **kwargs):
            result = commit(*args, **kwargs)
            committed.append(time.perf_counter())
            return result

        manager.commit = timed_commit  # save_async hands `self.commit` to the background thread
        out = []
        for _ in range(REPEATS):
            t0, block = self._save(manager)
            saved = self.step
            overlap = [timed(self.train_step) for _ in range(OVERLAP_STEPS)]
            self.step += OVERLAP_STEPS
            wait = timed(manager.wait)
            self.probe.on = False
            out.append({"step": saved, "block_s": block, "background_s": committed[-1] - t0,
                        "overlap_steps": OVERLAP_STEPS, "overlap_step_s": statistics.mean(overlap), "wait_s": wait,
                        "read_bytes": classify(self.probe.take(), self.rank)})  # fmt: skip
        return out


def written(directory: Path, rank: int) -> dict:
    """Bytes of the DCP checkpoint in `directory`: in all, and written by `rank`."""
    from mhc_train.checkpoint.formats import FORMATS

    sizes = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    own = sum(s for n, s in sizes.items() if n.endswith(".distcp") and FORMATS["dcp"].writer_of(n) == rank)
    return {"checkpoint_bytes": sum(sizes.values()), "own_shard_bytes": own, "files": len(sizes)}


def main(argv: list[str]) -> None:
    from mhc_train.checkpoint import CheckpointManager
    from mhc_train.config import load_config
    from mhc_train.io.rundir import RunDir
    from mhc_train.model import build_model
    from mhc_train.parallel import barrier, build_engine, builds_on_meta, init_distributed
    from mhc_train.plan.measure import synthetic_batch

    cfg = load_config(argv)
    torch.set_num_threads(1)
    info = init_distributed(cfg.train.device)
    out = Path(os.environ[ENV])
    run_dir = out / "run"
    model = build_model(cfg.model, cfg.connection, seed=cfg.train.seed, device="meta" if builds_on_meta(cfg) else "cpu")
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg, info)
    batch = synthetic_batch(cfg)

    def train_step() -> None:
        engine.forward_backward(batch)
        engine.step()

    train_step()  # AdamW's moments exist from here on
    step_s = statistics.median(timed(train_step) for _ in range(3))
    saves = Saves(engine, train_step, ReadProbe(run_dir / "checkpoints"), info.rank, lambda: barrier(info))
    sync = saves.sync(CheckpointManager(run_dir, replace(cfg.checkpoint, async_save=False), info))
    manager = CheckpointManager(run_dir, replace(cfg.checkpoint, async_save=True), info)
    asyn = saves.asynchronous(manager)
    manager.close()
    barrier(info)
    size = written(RunDir(run_dir).dcp_dir(RunDir.tag(saves.step - OVERLAP_STEPS)), info.rank)
    result = {"rank": info.rank, "world": info.world, "n_params": n_params, "step_s": step_s, **size, "sync": sync,
              "async": asyn}  # fmt: skip
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
