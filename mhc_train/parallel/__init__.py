"""Parallelism applied to a built model from outside; the model never imports this package.

`build_engine(model, cfg, dist)` (build.py) is the entry point: it returns an `Engine` (engine.py), the one interface
the trainer drives. Its config rules (pipeline, world size) live in `mhc_train.config.validate`, so importing this
package changes no validation.
"""

from mhc_train.parallel.build import build_engine, builds_on_meta
from mhc_train.parallel.dist import (
    DistInfo,
    any_rank,
    any_rank_flag,
    barrier,
    broadcast_from_main,
    exchange_without_deadline,
    init_distributed,
    read_scalars,
    shutdown,
)
from mhc_train.parallel.engine import Engine
from mhc_train.parallel.recompute import MODES, apply_recompute, optimal_block, plan_blocks

__all__ = [
    "MODES",
    "DistInfo",
    "Engine",
    "any_rank",
    "any_rank_flag",
    "apply_recompute",
    "barrier",
    "broadcast_from_main",
    "build_engine",
    "exchange_without_deadline",
    "builds_on_meta",
    "init_distributed",
    "optimal_block",
    "plan_blocks",
    "read_scalars",
    "shutdown",
]
