"""What one rank holds under the configured parallelism, read from the real sharded layout on the meta device.

`rank_layout(cfg, world, rank)` is the one place that applies the parallelism: under torch's fake process group it
builds the model on `meta` and runs `parallel.build`'s own steps up to sharding (`sharded_modules`: cut this rank's
pipeline stages, recompute, FSDP2 / HSDP over the mesh), then reads what each rank's parameters hold (a DTensor by its
local shard). Nothing is materialised, so a 70B layout costs no memory. DeepSpeed cannot initialise under a fake
process group, so its ZeRO stages are sized by arithmetic on the partition sizes (`deepspeed_layout`).

Notes:
1. The fake process group is started here and torn down before returning (`fake_group`); one rank's view per call.
   A caller that already has a process group gets a clear error instead of a second one.
2. `Layout.units` lists the full (unsharded) element count and gather dtype of every FSDP unit: the gathers in
   flight (the buffers term) are the largest unit(s), not the whole model, unless the model is one unit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from mhc_train.config import Config
from mhc_train.plan.errors import PlanError

DEEPSPEED_NOTE = "DeepSpeed cannot initialise under a fake process group: ZeRO sized by arithmetic on its partitions"


@dataclass
class Layout:
    """One rank's share of the model (element counts; dtypes as torch dtypes)."""

    engine: str  # none | ddp | fsdp | deepspeed | pipeline
    total_numel: int  # parameters of the whole model
    held_numel: int  # parameter elements this rank stores
    param_dtype: torch.dtype = torch.float32
    units: list[tuple[int, torch.dtype]] = field(default_factory=list)  # FSDP units: (full numel, gather dtype)
    stage_ids: list[int] = field(default_factory=list)  # pipeline stages this rank runs
    n_stages: int = 1
    dp: int = 1  # data-parallel ranks sharing one copy of this rank's layers
    pp: int = 1
    layers: int = 0  # transformer blocks this rank runs
    first: bool = True  # holds the embedding
    last: bool = True  # holds the final norm and head
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def fake_group(world: int, rank: int):
    """torch's fake process group at `world` ranks, as rank `rank` (no communication happens)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise PlanError("a process group is already running in this process: run `mhc-train plan` on its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _numel(params) -> tuple[int, torch.dtype]:
    from mhc_train.parallel.state import local

    params = list(params)
    held = sum(local(p).numel() for p in params)
    return held, (params[0].dtype if params else torch.float32)


def fsdp_units(module) -> list[tuple[int, torch.dtype]]:
    """(full numel, gather dtype) of each FSDP unit of `module`: its parameters outside nested units."""
    from torch.distributed.fsdp import FSDPModule

    units = []
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        nested = {id(p) for c in m.modules() if c is not m and isinstance(c, FSDPModule) for p in c.parameters()}
        own = [p for p in m.parameters() if id(p) not in nested]
        policy = getattr(m._get_fsdp_state(), "_mp_policy", None)
        dtype = getattr(policy, "param_dtype", None) or (own[0].dtype if own else torch.float32)
        units.append((sum(_gathered_numel(p) for p in own), dtype))
    return units


def _gathered_numel(p) -> int:
    """Elements an FSDP all-gather of `p` materialises on a rank: the whole parameter, or under expert parallelism
    below dp (a DTensor also sharded over "ep") the rank's expert group's share, E / ep experts."""
    names = getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None) or ()
    return p.numel() // p.device_mesh["ep"].size() if "ep" in names else p.numel()


def deepspeed_layout(cfg: Config, world: int, total: int, layers: int) -> Layout:
    """ZeRO 1/2/3 in DeepSpeed's fp32 mode (data_parallel.py): stage 3 partitions the parameters, 1-2 keep them."""
    held = -(-total // world) if cfg.parallel.zero_stage == 3 else total
    lay = Layout("deepspeed", total, held, torch.float32, dp=world, layers=layers)
    lay.notes.append(DEEPSPEED_NOTE)
    return lay


def rank_layout(cfg: Config, world: int, rank: int, amp) -> Layout:
    """This rank's layout at `world` ranks (see the module docstring). `amp`: the autocast dtype or None."""
    from mhc_train.model.transformer import Transformer
    from mhc_train.parallel.build import BuildContext, sharded_modules
    from mhc_train.parallel.dist import DistInfo
    from mhc_train.parallel.mesh import build_mesh

    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.connection)
    total = sum(t.numel() for t in model.parameters())
    if p.engine == "deepspeed" and p.pp == 1:
        return deepspeed_layout(cfg, world, total, cfg.model.n_layer)
    with fake_group(world, rank):
        info = DistInfo(rank, world, 0, torch.device("cpu"))
        ctx = BuildContext(cfg, info, build_mesh(cfg, info), amp)
        modules, plan = sharded_modules(model, ctx)  # parallel.build's own steps 1-5, on meta
        held, dtype = _numel(q for m in modules for q in m.parameters())
        units = [u for m in modules for u in fsdp_units(m)]  # [] without FSDP
        if plan is not None:
            ids = list(plan.stage_ids)
            return Layout("pipeline", total, held, dtype, units, ids, plan.n_stages, ctx.mesh.dp, p.pp,
                          sum(len(m.layers) for m in modules), 0 in ids, plan.n_stages - 1 in ids)  # fmt: skip
        if p.engine == "fsdp":
            return Layout("fsdp", total, held, dtype, units, dp=ctx.mesh.dp, layers=cfg.model.n_layer)
    return Layout(p.engine, total, held, dtype, dp=world, layers=cfg.model.n_layer)
