"""Training: the loop and the components it calls.

- `trainer.py`: `Trainer` (set-up, resume) with `train_step()` and a loop that calls the components in a fixed order;
  `train(cfg)` runs one to the end;
- components that own their cadence and state: `step_metrics.py` (metrics.jsonl, throughput, the progress bar),
  `evaluator.py` (val loss), `checkpointer.py` (resume point, saves; the only user of `mhc_train.checkpoint` here),
  `diagnostics.py` (the connection's stability diagnostics);
- policies: `nonfinite.py` (skip or stop on a NaN/inf loss), `preemption.py` (SIGTERM / SIGINT);
- `lock.py` (one owner per run directory), `metrics.py` (the metrics.jsonl reader/writer), `throughput.py` (FLOPs per
  token, MFU, step-time phases), `errors.py`.
"""
