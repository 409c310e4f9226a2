"""What one rank holds under the configured parallelism, read from the real sharded layout on the meta device.

`rank_layout(cfg, world, rank)` is the one place that applies the parallelism (the coordinator switches it to
`parallel.build`'s ordered `apply_*` steps once they build on meta): under torch's fake process group it builds the
model on `meta`, cuts this rank's pipeline stages, applies recompute and FSDP2 exactly as `parallel.build` does, and
reads what each rank's parameters hold (a DTensor by its local shard). DeepSpeed cannot initialise under a fake
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
    resident_numel: int = 0  # elements of a plain full-model copy kept beside the trained ones (fp32)
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
        units.append((sum(p.numel() for p in own), dtype))
    return units


def deepspeed_layout(cfg: Config, world: int, total: int, layers: int) -> Layout:
    """ZeRO 1/2/3 in DeepSpeed's fp32 mode (data_parallel.py): stage 3 partitions the parameters, 1-2 keep them."""
    held = -(-total // world) if cfg.parallel.zero_stage == 3 else total
    lay = Layout("deepspeed", total, held, torch.float32, dp=world, layers=layers)
    lay.notes.append(DEEPSPEED_NOTE)
    return lay


def per_block_units(model, mesh, amp):
    """A projection, not today's build: FSDP2 units per block under recompute with bf16 gathers (what the `recomp`
    change of issue 24 builds), for `make_plan(..., projected=True)`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(amp or torch.float32, torch.float32, cast_forward_inputs=False)
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def rank_layout(cfg: Config, world: int, rank: int, amp, projected: bool = False) -> Layout:
    """This rank's layout at `world` ranks (see the module docstring). `amp`: the autocast dtype or None.
    `projected`: FSDP under recompute sharded per block (`per_block_units`) instead of today's one unit."""
    from mhc_train.model.transformer import Transformer
    from mhc_train.parallel import apply_recompute
    from mhc_train.parallel.build import PER_BLOCK_FSDP_SCHEDULES
    from mhc_train.parallel.dist import DistInfo
    from mhc_train.parallel.fsdp import shard

    p = cfg.parallel
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.connection)
    total = sum(t.numel() for t in model.parameters())
    if p.engine == "deepspeed" and p.pp == 1:
        return deepspeed_layout(cfg, world, total, cfg.model.n_layer)
    with fake_group(world, rank):
        if p.pp > 1:
            from mhc_train.parallel.pipeline import cut_stage, pipeline_mesh
            from mhc_train.parallel.schedules import pipeline_layout

            mesh = pipeline_mesh(DistInfo(rank, world, 0, torch.device("cpu")), p.pp)
            n_stages, layout = pipeline_layout(p.pp_schedule, p.pp, p.pp_stages_per_rank, p.pp_schedule_csv)
            ids = layout[mesh.pp_rank]
            stages = [cut_stage(model, s, n_stages) for s in ids]
            for stage in stages:
                apply_recompute(stage, p.recompute, p.recompute_block)
            if mesh.dp > 1:
                per_block = p.pp_schedule in PER_BLOCK_FSDP_SCHEDULES
                stages = [shard(s, mesh.dp_mesh, per_block, compute_dtype=amp) for s in stages]
            held, dtype = _numel(q for s in stages for q in s.parameters())
            units = [u for s in stages for u in fsdp_units(s)] if mesh.dp > 1 else []
            lay = Layout("pipeline", total, held, dtype, units, list(ids), n_stages, mesh.dp, p.pp,
                         sum(len(s.layers) for s in stages), 0 in ids, n_stages - 1 in ids)  # fmt: skip
            # today's build_pipeline: every rank builds the whole model and cuts views of it (the rest stays
            # allocated); with dp > 1 the stages are sharded from a copy and only rank 0 keeps the plain model
            if mesh.dp == 1 or rank == 0:
                lay.resident_numel = total - (held if mesh.dp == 1 else 0)
                lay.notes.append("pipeline ranks keep the plain model built whole (today's build_pipeline)")
            return lay
        apply_recompute(model, p.recompute, p.recompute_block)
        if p.engine == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
            if projected and model.block_runner is not None:
                model = per_block_units(model, mesh, amp)
            else:
                model = shard(model, mesh, per_block=True, compute_dtype=amp)
            held, dtype = _numel(model.parameters())
            lay = Layout("fsdp", total, held, dtype, fsdp_units(model), dp=world, layers=cfg.model.n_layer)
            if projected and p.recompute != "none":
                lay.notes.append("projected: FSDP units per block under recompute, bf16 gathers (issue 24 recomp)")
            return lay
    held, dtype = _numel(model.parameters())
    return Layout(p.engine, total, held, dtype, dp=world, layers=cfg.model.n_layer)
