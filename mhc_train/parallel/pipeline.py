"""Pipeline parallelism on torch.distributed.pipelining, applied to a built model by cutting it into stages.

- Stages are cut from the plain model by deleting what a stage does not own (blocks outside its range; the embedding
  except on the first stage; the final norm and head except on the last), so every parameter keeps its original
  name and a checkpoint does not depend on the layout.
- One tensor crosses each stage boundary: the `[B, T, n, C]` stream state (n times the residual baseline's traffic).
- Schedules: `1f1b` (one stage per rank), `interleaved1f1b` (v stages per rank), the V-shaped `zbv` and `dualpipev`
  (rank r holds stages r and 2P-1-r; micro-batches enter and leave at rank 0), or a `csv` schedule file in torch's
  compute-only format (the file decides which stages each rank holds). DualPipeV's OVERLAP_F_B actions run through our
  own function (overlap.py): on CUDA one micro-batch's forward overlaps another's backward.
- Recompute is applied to each stage module on its own, so blocks never cross a stage boundary and each stage keeps
  its x_{l0} locally: recomputation never waits on communication (`recompute_block=stage`: one block per stage).
- Pipeline x data parallel: ranks form a (pp, dp) mesh and each stage is sharded over its dp group with FSDP2.
"""

from __future__ import annotations

import copy

import torch

from mhc_train.parallel.data_parallel import TorchEngine

SCHEDULES = ("1f1b", "interleaved1f1b", "zbv", "dualpipev", "csv")
SPLIT_BACKWARD = ("zbv", "dualpipev")  # schedules that run input and weight gradients as separate actions


def read_csv_schedule(path: str, pp: int) -> tuple[int, dict[int, list[int]], int, bool]:
    """A compute-only schedule file in torch's CSV format (one row per pipeline rank, actions such as `0F3`, `1B0`,
    `2I1`, `2W1`): returns (stage count, {rank: its stage ids}, micro-batch count, whether it splits the backward).
    Raises ValueError naming the problem; needs no process group."""
    import csv

    from torch.distributed.pipelining.schedules import _Action

    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in row if c.strip()] for row in csv.reader(f)]
    except OSError as e:
        raise ValueError(f"cannot read the schedule file {path!r} ({e.strerror})") from e
    if len(rows) != pp:
        raise ValueError(f"the schedule file {path!r} has {len(rows)} rows but parallel.pp={pp} (one row per rank)")
    layout, mbs, split = {}, set(), False
    for rank, row in enumerate(rows):
        try:
            actions = [_Action.from_str(c) for c in row]
        except Exception as e:
            raise ValueError(f"the schedule file {path!r}, row {rank}: {e}") from e
        layout[rank] = sorted({a.stage_index for a in actions})
        mbs |= {a.microbatch_index for a in actions if a.microbatch_index is not None}
        split |= any(a.computation_type.value in ("I", "W") for a in actions)
        if not layout[rank]:
            raise ValueError(f"the schedule file {path!r}, row {rank}: rank {rank} runs no stage")
    stages = sorted(s for ids in layout.values() for s in ids)
    if stages != list(range(len(stages))):
        raise ValueError(f"the schedule file {path!r} must place stages 0..N-1 once each on the ranks, got {layout}")
    return len(stages), layout, len(mbs), split


def pipeline_layout(schedule: str, pp: int, stages_per_rank: int = 0, csv_path: str = ""):
    """(stage count, {pipeline rank: its global stage ids}) of a schedule.

    1f1b: rank r holds stage r. interleaved1f1b: v stages per rank (default 2), rank r holds r, r+pp, ...
    zbv / dualpipev: the V, rank r holds stages r and 2pp-1-r (micro-batches enter and leave at rank 0).
    csv: whatever the file places on each rank."""
    if schedule == "1f1b":
        return pp, {r: [r] for r in range(pp)}
    if schedule == "interleaved1f1b":
        v = stages_per_rank or 2
        return pp * v, {r: [r + k * pp for k in range(v)] for r in range(pp)}
    if schedule in SPLIT_BACKWARD:
        return 2 * pp, {r: [r, 2 * pp - 1 - r] for r in range(pp)}
    if schedule == "csv":
        n, layout, _, _ = read_csv_schedule(csv_path, pp)
        return n, layout
    raise ValueError(f"unknown pipeline schedule {schedule!r}: allowed values are {', '.join(SCHEDULES)}")


def layer_ranges(n_layer: int, n_stages: int) -> list[range]:
    if n_layer % n_stages:
        raise ValueError(f"model.n_layer={n_layer} is not divisible by the {n_stages} pipeline stages")
    per = n_layer // n_stages
    return [range(s * per, (s + 1) * per) for s in range(n_stages)]


def cut_stage(model, stage: int, n_stages: int):
    """A view of `model` holding only stage `stage`'s blocks (and the embedding / head at the ends). The stage shares
    its parameters with `model` (a shallow copy with its own module tables), so `model` stays current for them."""
    part = copy.copy(model)
    for key, value in list(vars(part).items()):  # own module tables and hook registries; shared leaves
        if isinstance(value, (dict, set)):
            setattr(part, key, copy.copy(value))
    keep = [str(i) for i in layer_ranges(len(model.layers), n_stages)[stage]]
    part.layers = torch.nn.ModuleDict({k: model.layers[k] for k in keep})
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm, part.output = None, None
    part.layer_runner = None
    return part


def build_schedule(name: str, stages, n_microbatches: int, loss_fn, csv_path: str = ""):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleDualPipeV,
        ScheduleInterleaved1F1B,
        ScheduleZBVZeroBubble,
    )
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    if name == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    if name == "csv":  # torch's runtime lowers the compute-only actions and adds the sends and receives
        schedule = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn)
        schedule._load_csv(csv_path)
        return schedule
    cls = {"interleaved1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
    return cls[name](stages, n_microbatches, loss_fn=loss_fn)


def pipeline_stages(model, layout, rank: int, device, group=None, dp_mesh=None, recompute=None, schedule="1f1b"):
    """(stage modules, PipelineStage objects) for pipeline rank `rank` of `layout` (from `pipeline_layout`). With
    `dp_mesh`, the stages are cut from a copy of the model and sharded over the data-parallel group with FSDP2
    (after recompute is applied)."""
    from torch.distributed.pipelining import PipelineStage

    from mhc_train.parallel.recompute import apply_recompute

    n_stages, ranks = layout
    ids = ranks[rank]
    source = copy.deepcopy(model) if dp_mesh is not None else model  # FSDP must not shard rank 0's eval model
    modules = [cut_stage(source, s, n_stages) for s in ids]
    for m in modules:  # recompute blocks never cross a stage: each stage is planned on its own sites
        apply_recompute(m, *(recompute or ("none", "auto")))
    if dp_mesh is not None:
        from mhc_train.parallel.fsdp import shard

        per_block = schedule in ("1f1b", "interleaved1f1b")  # no split backward (see fsdp.py note 1)
        modules = [shard(m, dp_mesh, per_block) for m in modules]
    stages = [PipelineStage(m, s, n_stages, torch.device(device), group=group) for m, s in zip(modules, ids)]
    return modules, stages


class PipelineEngine(TorchEngine):
    """The trainer's engine for pipeline runs: one schedule step per optimiser step (each data-parallel replica's
    slice of the global batch is split into `n_microbatches`), a global grad-norm clip across stages, and full-model
    syncs to rank 0 for eval/checkpoints.

    Ranks form a (pp, dp) mesh, pipeline outermost: rank = pp_rank * dp + dp_rank. With dp > 1 every stage is
    sharded over its dp group with FSDP2 (`parallel.engine=fsdp`), which the pipelining runtime drives itself."""

    name = "pipeline"  # step / skip / lr / load_state_dict come from TorchEngine; __init__, run, clip differ

    def __init__(
        self,
        model,
        schedule: str,
        n_microbatches: int,
        info,
        device,
        grad_clip: float,
        recompute: str,
        recompute_block,
        build_optimizer,
        build_scheduler,
        overlap: bool = True,
        pp: int | None = None,
        stages_per_rank: int = 0,
        csv_path: str = "",
    ):
        import torch.distributed as dist

        self.model, self.info, self.grad_clip, self.device = model, info, grad_clip, device
        self.pp = pp or info.world
        self.dp = info.world // self.pp
        group, dp_mesh = None, None
        self.pp_rank, self.dp_rank = info.rank, 0
        if self.dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(torch.device(device).type, (self.pp, self.dp), mesh_dim_names=("pp", "dp"))
            group, dp_mesh = mesh["pp"].get_group(), mesh["dp"]
            self.pp_rank, self.dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
        layout = pipeline_layout(schedule, self.pp, stages_per_rank, csv_path)
        self.modules, self.stages = pipeline_stages(
            model, layout, self.pp_rank, device, group, dp_mesh, (recompute, recompute_block), schedule
        )
        if dp_mesh is not None:  # the stages were cut from a copy: the plain model is rank 0's eval copy only
            from mhc_train.parallel.fsdp import release_eval_copy

            release_eval_copy(model, info)
        self.local = torch.nn.ModuleList(self.modules)
        self.optimizer = build_optimizer(self.local)
        self.scheduler = build_scheduler(self.optimizer)
        self.params = [p for p in self.local.parameters()]
        self.schedule = build_schedule(schedule, self.stages, n_microbatches, self._loss_fn, csv_path)
        self.overlap = None
        if schedule == "dualpipev" and overlap:  # our OVERLAP_F_B: forward and backward overlap on CUDA
            from mhc_train.parallel.overlap import register_overlap

            self.overlap = register_overlap(self.schedule, device)
        self.first = any(st.is_first for st in self.stages)
        self.last = any(st.is_last for st in self.stages)
        self.forward = None  # no single forward: the schedule runs the stages
        self._dist = dist

    def describe(self) -> str:
        from mhc_train.parallel.fsdp import local

        held = sum(local(p).numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        ids = [st.stage_index for st in self.stages]
        dp = f" x dp={self.dp} (FSDP2 per stage)" if self.dp > 1 else ""
        return (
            f"pipeline: pp={self.pp}{dp}; rank {self.info.rank} runs stages {ids} and holds {held:,} of {total:,} "
            "parameter elements"
        )

    @staticmethod
    def _loss_fn(logits, target):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())

    def run(self, x, y) -> float:
        """Forward and backward of this replica's slice through the schedule; returns the global mean loss on every
        rank (the last-stage ranks hold one replica's mean each)."""
        losses: list = []
        x, y = x.to(self.device), y.to(self.device)
        if self.first and self.last:
            self.schedule.step(x, target=y, losses=losses)
        elif self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        t = torch.tensor([torch.stack(losses).float().mean().item() if losses else 0.0], dtype=torch.float64)
        self._dist.all_reduce(t)  # exactly one rank per replica holds the last stage
        return t.item() / self.dp

    def overlap_report(self) -> str:
        """One line on what the overlapped F/B pairs did so far on this rank (empty without our OVERLAP_F_B)."""
        if self.overlap is None:
            return ""
        o = self.overlap
        where = "forward on a side stream, FFN post_res on a priority -1 stream" if o.cuda else "in order (CPU)"
        return (
            f"OVERLAP_F_B: {o.pairs} overlapped F/B pairs, {o.runner.calls} FFN post_res through the priority "
            f"runner; {where}"
        )

    def clip(self) -> float:
        from mhc_train.parallel.fsdp import local

        sq = torch.zeros(1, dtype=torch.float64)
        for p in self.params:  # FSDP shards partition each gradient, so every element is counted once
            if p.grad is not None:
                sq += local(p.grad.detach()).double().square().sum().cpu()
        self._dist.all_reduce(sq)
        norm = sq.sqrt().item()
        if self.grad_clip > 0 and norm > self.grad_clip:
            scale = self.grad_clip / (norm + 1e-6)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    def _gather(self, local: dict) -> dict:
        gathered = [None] * self.info.world if self.info.is_main else None
        self._dist.gather_object(local, gathered, dst=0)
        return {k: v for part in gathered for k, v in part.items()} if self.info.is_main else {}

    def sync_full_model(self) -> None:
        """Rank 0's `model` gets every stage's current weights (for evaluation, diagnostics and checkpoints)."""
        from mhc_train.parallel.fsdp import full_state

        merged = self._gather(full_state(self.modules))
        if self.info.is_main:
            self.model.load_state_dict(merged, strict=False)

    def gather_grads(self) -> dict:
        """Every stage's current gradients by parameter name, merged on rank 0 ({} elsewhere). A collective."""
        from mhc_train.parallel.fsdp import full

        grads = {
            n: full(p.grad).detach().cpu().clone()
            for m in self.modules
            for n, p in m.named_parameters()
            if p.grad is not None
        }
        return self._gather(grads)

    def _names(self) -> dict:
        """Local parameters -> their names in the plain model (stages keep the original names)."""
        return {p: n for m in self.modules for n, p in m.named_parameters()}

    def dcp_state(self) -> dict:
        """This rank's stages' model and optimizer tensors by parameter name (DCP merges the ranks' keys)."""
        from mhc_train.train.checkpoint import dcp_state

        return dcp_state(self.modules, self.optimizer, self._names())

    def state_dict(self) -> dict:
        """Every rank's optimizer state by parameter name, merged on rank 0: loads into any layout."""
        from mhc_train.parallel.fsdp import full_optimizer_state

        mine = full_optimizer_state(self.optimizer, self._names())
        merged = self._gather(mine["state"])
        if not self.info.is_main:
            return {}
        return {"optimizer": {"state": merged, "groups": mine["groups"]}, "scheduler": self.scheduler.state_dict()}
