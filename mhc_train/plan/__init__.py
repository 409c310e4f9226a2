"""`mhc-train plan`: per-GPU memory of a configured run at any world size, on one CPU machine, before the launch.

- `make_plan(cfg, world, device_gib)` (estimate.py): params, grads, optimizer, activations, buffers, total, fits.
- layout.py: one rank's share of the model from the real sharded layout on `meta` under torch's fake process group.
- activations.py: one micro-batch traced at the real shape on fake tensors.
- live.py: `LiveBytes`, the live-tensor-bytes counter the trace uses and the tests measure real steps with.
"""

from mhc_train.plan.errors import PlanError
from mhc_train.plan.estimate import KEYS, format_plan, make_plan
from mhc_train.plan.live import LiveBytes, measure_step, state_bytes

__all__ = ["KEYS", "LiveBytes", "format_plan", "PlanError", "make_plan", "measure_step", "state_bytes"]
