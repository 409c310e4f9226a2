"""Parallelism applied to a built model from outside; the model never imports this package.

`build_engine(model, cfg, dist)` (build.py) is the entry point: it returns an `Engine` (engine.py), the one interface
the trainer drives, after applying the parallelism in one ordered list of `apply_*` steps over one device mesh
(mesh.py). Its config rules (pipeline, world size) live in `mhc_train.config.validate`, so importing this
package changes no validation.
"""

from mhc_train.parallel.build import BuildContext, build_engine, builds_on_meta
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
from mhc_train.parallel.mesh import ParallelMesh, build_mesh
from mhc_train.parallel.recompute import MODES, apply_recompute, optimal_block, plan_blocks

__all__ = [
    "MODES",
    "BuildContext",
    "DistInfo",
    "Engine",
    "ParallelMesh",
    "any_rank",
    "any_rank_flag",
    "apply_recompute",
    "barrier",
    "broadcast_from_main",
    "build_engine",
    "build_mesh",
    "exchange_without_deadline",
    "builds_on_meta",
    "init_distributed",
    "optimal_block",
    "plan_blocks",
    "read_scalars",
    "shutdown",
]
