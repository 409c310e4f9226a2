"""Applied to a built model from outside; the model never imports this package."""

from mhc_train.parallel.recompute import MODES, apply_recompute, optimal_block, plan_blocks

__all__ = ["MODES", "apply_recompute", "optimal_block", "plan_blocks"]
