"""The loop's evaluator: the mean loss over a fixed set of validation batches, on its own cadence.

Notes:
- The validation batches are drawn once, when the evaluator is built, and reused at every evaluation, so every
  `val` record of a run (and of a resumed run) is measured on the same tokens.
- Evaluation is a collective (each rank evaluates its slice): every rank calls `maybe_run` at every step.
- Cadence: step 0 of a fresh run (the curve starts at the untrained model, ~ln(vocab)), every `train.eval_every`
  steps, and the last step.
"""

from __future__ import annotations

from mhc_train.config import Config
from mhc_train.train.step_metrics import StepMetrics


class Evaluator:
    def __init__(self, cfg: Config, engine, data, metrics: StepMetrics):
        t = cfg.train
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.val_set = data.val_batches(t.eval_batches, t.batch_size, t.seq_len)

    def evaluate(self) -> float:
        """The mean loss over the fixed val batches; every rank evaluates its slice (a collective)."""
        return self.engine.evaluate(self.val_set)

    def due(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.max_steps

    def at_start(self, step: int) -> None:
        """The untrained model's val loss, on a fresh start only."""
        if step == 0:
            self.metrics.record("val", 0, loss=self.evaluate())

    def maybe_run(self, step: int) -> None:
        if not self.due(step):
            return
        val = self.evaluate()
        self.metrics.record("val", step, loss=val)
        self.metrics.note(f"{self.cfg.run_name} step {step}: val loss {val:.4f}")
