"""The loop's checkpointer: the one place the trainer touches `CheckpointManager`.

It picks the checkpoint to resume from, restores the engine from it, and saves on its cadence: every
`checkpoint.every` steps and, with `checkpoint.save_final`, at the run's last step (`train.max_steps` or
`train.stop_at_step`). Retention (`keep_last`, milestones) and the file formats stay with the manager.

Notes:
- Rank 0 chooses the resume point (moving damaged checkpoints aside) and every rank follows it; the shards' digests
  are checked by every rank, each its share (`checkpoint.shared_verify`), so no rank reads them all.
- Every rank calls `save` (the engine's state may be sharded); `last` is the newest checkpoint this run wrote (and
  committed) or resumed from, named in the messages of a failed run.
- With `checkpoint.async_save` a save returns once staged and commits in the background; `wait` finishes it (the
  next save, the end of the run and a preemption call it; `close`, on every exit, waits without raising).
"""

from __future__ import annotations

from pathlib import Path

from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.config import Config
from mhc_train.io.log import get_logger
from mhc_train.io.rundir import RunDir
from mhc_train.parallel import DistInfo, broadcast_from_main
from mhc_train.train.lock import holds_a_run

logger = get_logger(__name__)


class Checkpointer:
    def __init__(self, cfg: Config, config_dict: dict, tokenizer_ref: dict, run_dir: RunDir, dist: DistInfo):
        self.cfg, self.config_dict, self.tokenizer_ref = cfg, config_dict, tokenizer_ref
        self.run_dir, self.dist = run_dir, dist
        self.manager = CheckpointManager(run_dir, cfg.checkpoint, dist)
        self.last: Path | None = None

    # ---- resume ------------------------------------------------------------------------------------------------
    def resume_point(self) -> tuple[dict, Path, list[str]] | None:
        """(state, path, allowed config changes) of the checkpoint to resume from, or None for a fresh start."""
        choice = None
        if self.dist.is_main:
            try:
                path, notes = self.manager.choose(self.cfg.checkpoint.resume)
                choice = (str(path) if path else None, notes, None)
            except CheckpointError as e:
                choice = (None, [], e)
        else:
            self.manager.follow_choice()  # verify this rank's share of each candidate's shards
        path, notes, error = broadcast_from_main(choice, self.dist)
        if error is not None:
            raise error
        for line in notes:
            logger.info(line)
        if path is None:
            if self.cfg.checkpoint.resume == "auto" and (held := holds_a_run(self.run_dir)):
                logger.info(f"{self.run_dir.root} holds {held} but no checkpoint that verifies: starting at step 0; "
                            "metrics.jsonl keeps the earlier records under their own segment")  # fmt: skip
            return None
        state, allowed = self.manager.read(Path(path), self.config_dict, self.tokenizer_ref)
        return state, Path(path), allowed

    def weights_of(self, state: dict) -> dict | None:
        """A file checkpoint's weights (None where the engine loads its own shards)."""
        return self.manager.weights_of(state)

    def restore(self, engine, state: dict, path: Path, allowed: list[str]) -> None:
        """Load the engine's state (optimizer, scheduler, RNG, ...) from a checkpoint read by `resume_point`."""
        for note in self.manager.restore(engine, state, path):
            logger.info(note)
        self.last = path
        logger.info(f"resumed from {path} at step {state['step']}")
        for line in allowed:
            logger.info(f"  config change on resume (allowed): {line}")

    # ---- save --------------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        ck, t = self.cfg.checkpoint, self.cfg.train
        last = step == t.max_steps or step == t.stop_at_step
        return bool((ck.every and step % ck.every == 0) or (last and ck.save_final))

    def save(self, engine, step: int, progress: dict) -> Path:
        """Every rank calls this. `progress` is the loop's counters (skipped steps, tokens, training time)."""
        meta = {
            **progress,
            "data": {"seed": self.cfg.train.seed, "next_step": step},
            "config": self.config_dict,
            "tokenizer": self.tokenizer_ref,
        }
        path = self.manager.save(engine, step, meta)  # finishes the save in flight first
        if not self.manager.in_flight:
            self.last = path
        return path

    def wait(self) -> Path | None:
        """Finish the save in flight, if any (raising its CheckpointError); the newest committed checkpoint."""
        self.last = self.manager.wait() or self.last
        return self.last

    def close(self) -> None:
        """Every exit: finish the save in flight (a failure is logged) and release its buffers."""
        self.manager.close()

    def maybe_save(self, engine, step: int, progress: dict) -> Path | None:
        """The checkpoint written at this step on the cadence, else None."""
        return self.save(engine, step, progress) if self.due(step) else None
