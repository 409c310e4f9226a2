"""The non-finite loss policy: a NaN or inf loss stops the run, or (`train.skip_nonfinite`) skips the step.

Notes:
- Abort (the default): a `TrainingError` naming the step, the loss, the last good checkpoint and the fixes.
- Skip: the step's update is dropped (the engine's `skip`), the step still counts, and the skips are counted (in the
  `train` records and the checkpoint) up to `train.max_skipped_steps`, past which the run stops as above.
"""

from __future__ import annotations

import math
from pathlib import Path

from mhc_train.config import TrainConfig
from mhc_train.io.log import get_logger
from mhc_train.train.errors import TrainingError

logger = get_logger(__name__)


class NonFinitePolicy:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.skipped = 0

    def accept(self, loss: float, step: int, last_ckpt: Path | None) -> bool:
        """True for a finite loss at `step` (the step being taken); False to skip it; raises to stop the run."""
        if math.isfinite(loss):
            return True
        t = self.cfg
        where = f"at step {step} (loss {loss})"
        last = str(last_ckpt) if last_ckpt else "none yet"
        if not t.skip_nonfinite:
            raise TrainingError(
                f"non-finite loss {where}. Last good checkpoint: {last}. Lower optim.lr or raise schedule.warmup_steps, use "
                "train.precision=fp32, or set train.skip_nonfinite=true to skip such steps (they are counted)."
            )
        self.skipped += 1
        logger.info(f"skipping the step {where}; {self.skipped} skipped so far")
        if self.skipped > t.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped} non-finite steps (more than train.max_skipped_steps={t.max_skipped_steps}), the last "
                f"{where}. Last good checkpoint: {last}. Lower optim.lr or use train.precision=fp32."
            )
        return False
