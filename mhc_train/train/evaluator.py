"""The loop's evaluator: the mean loss over a fixed set of validation batches, on its own cadence.

Notes:
- The validation batches are drawn once, when the evaluator is built, and reused at every evaluation, so every
  `val` record of a run (and of a resumed run) is measured on the same tokens.
- Evaluation is a collective (each rank evaluates its slice): every rank calls `maybe_run` at every step.
- A blend (data.blend) is evaluated per source: each source's own fixed slice; the record's `loss` is the
  weight-averaged per-source loss, `source_loss` holds each source's.
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
        self.source_sets = data.val_sets(t.eval_batches, t.batch_size, t.seq_len) if cfg.data.blend else None
        self.source_weights = dict(zip(data.labels, data.weights.tolist())) if cfg.data.blend else None
        self.source_loss: dict[str, float] = {}  # a blend's per-source losses of the last evaluation

    def evaluate(self) -> float:
        """The mean loss over the fixed val batches; every rank evaluates its slice (a collective)."""
        if self.source_sets is None:
            return self.engine.evaluate(self.val_set)
        self.source_loss = {k: self.engine.evaluate(batches) for k, batches in self.source_sets.items()}
        return sum(self.source_weights[k] * loss for k, loss in self.source_loss.items())

    def _extra(self) -> dict:
        return {"source_loss": self.source_loss} if self.source_sets is not None else {}

    def due(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.max_steps

    def at_start(self, step: int) -> None:
        """The untrained model's val loss, on a fresh start only."""
        if step == 0:
            self.metrics.record("val", 0, loss=self.evaluate(), **self._extra())

    def maybe_run(self, step: int) -> None:
        if not self.due(step):
            return
        val = self.evaluate()
        self.metrics.record("val", step, loss=val, **self._extra())
        self.metrics.note(f"{self.cfg.run_name} step {step}: val loss {val:.4f}")
