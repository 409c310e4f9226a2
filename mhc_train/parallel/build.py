"""`build_engine`: parallelism applied to a plain model in one place, in one fixed order, and the only place that knows
the engine kinds. Every step is an `apply_*` function taking one `BuildContext` (the config, the process group, the
device mesh, the precision, the seed, a checkpoint's weights, the optimizer and scheduler factories).

The order (torchtitan's `parallelize_llama` shape), and why:

    1. cut stages     (pp > 1) each rank prunes its stage(s) from the meta skeleton: nothing else is ever built
    2. tp             tensor + sequence parallelism (parallel.tp > 1; tensor_parallel.apply_tp): DTensor plan on the
                      copy the engine trains (TPEngine); apply_ep (the MoE issue) goes here too
    3. recompute      a wrapper on each stage / the model, before sharding: FSDP units follow the recompute blocks
    4. compile        per block (train.compile, `parallel/compile.py`), after recompute: the compiled region is what runs
    5. shard          FSDP2 / HSDP over the mesh's data-parallel dims, on the meta device (no storage yet)
    6. materialise    allocate this rank's shards or stage on its device, fill from the seed or the checkpoint
    7. optimizer      over what this rank trains
    8. engine         the step contract the trainer drives (pipeline schedule, FSDP, DeepSpeed, DDP, one process)

Per layout:

    parallel.pp > 1            1 -> 2 (ep) -> 3 -> 4 -> 5 (dp > 1, or bf16 at dp = 1: `stage_fsdp`) -> 6 -> 7 -> 8
    parallel.pp, tp > 1        1 -> 2 (each stage) -> 3 -> 4 -> 5 -> 6 -> 7 -> 8 (3-D with dp > 1: PP x TP x FSDP2)
    parallel.engine=none/ddp   3 -> 4 -> 7 -> 8 (a built, initialised model)
    parallel.tp > 1, none      3 -> 2 -> 4 -> 7 -> 8 (TPEngine: the plan on a copy, world = tp)
    parallel.engine=fsdp       3 -> 4 -> 8 (FSDPEngine shards, materialises and builds its optimizer itself)
    parallel.engine=deepspeed  3 -> 4 -> 8 (DeepSpeed partitions while it materialises, and owns its optimizer)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mhc_train.config import SPLIT_BACKWARD_SCHEDULES, Config, ConfigError
from mhc_train.optim import build_optimizer, build_scheduler
from mhc_train.parallel.compile import apply_compile as compile_blocks
from mhc_train.parallel.data_parallel import DeepSpeedEngine
from mhc_train.parallel.dist import DistInfo
from mhc_train.parallel.engine import Engine, LocalEngine
from mhc_train.parallel.expert_parallel import apply_ep
from mhc_train.parallel.fsdp import FSDPEngine, shard
from mhc_train.parallel.mesh import ParallelMesh, build_mesh
from mhc_train.parallel.pipeline import PipelineEngine, StagePlan, cut_stage
from mhc_train.parallel.recompute import apply_recompute as recompute_module
from mhc_train.parallel.schedules import pipeline_layout
from mhc_train.parallel.state import materialise, on_meta
from mhc_train.parallel.tensor_parallel import TPEngine, TPFSDPEngine, apply_tp

PER_BLOCK_FSDP_SCHEDULES = ("1f1b", "interleaved1f1b")  # no split backward (see fsdp.py note 1)


def autocast_dtype(precision: str, device: torch.device):
    """The precision policy, the same on every engine: fp32 parameters, gradients and optimizer states (the master
    weights), compute under torch.autocast in bf16 for `bf16` (and `auto` on CUDA), the connection's coefficient path
    in fp32 inside it (`ops.coefficient_region`). None: everything in the parameters' dtype (fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def use_fast_fp32_matmul(device: torch.device) -> None:
    """On CUDA, fp32 matmuls (what autocast leaves in fp32, and fp32 runs) may use TF32 tensor cores."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class BuildContext:
    """Everything the `apply_*` steps and the engines read, in one object instead of long argument lists."""

    cfg: Config
    dist: DistInfo
    mesh: ParallelMesh
    amp: torch.dtype | None  # the autocast dtype (None: fp32 compute)
    weights: dict | None = None  # a file checkpoint's full weights by name, or None (initial values from the seed)

    @property
    def device(self) -> torch.device:
        return torch.device(self.dist.device)

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    def make_optimizer(self, module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, cfg=self.cfg.optim)

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        return build_scheduler(optimizer, total=self.cfg.train.max_steps, cfg=self.cfg.schedule,
                               connection_warmup_steps=self.cfg.optim.connection_warmup_steps)  # fmt: skip


def build_context(cfg: Config, dist: DistInfo, weights: dict | None = None, pp: int | None = None) -> BuildContext:
    amp = autocast_dtype(cfg.train.precision, torch.device(dist.device))
    if cfg.model.stream_dtype == "bf16" and amp is None:
        raise ConfigError(
            f"model.stream_dtype='bf16' needs bf16 compute, but train.precision={cfg.train.precision!r} runs fp32 on "
            f"{torch.device(dist.device).type}: set train.precision=bf16, or model.stream_dtype=fp32"
        )
    return BuildContext(cfg, dist, build_mesh(cfg, dist, pp), amp, weights)


def builds_on_meta(cfg: Config) -> bool:
    """Whether `build_engine` wants the plain model built on the meta device (it then allocates and fills only what
    each rank trains): a pipeline (each rank its stages), DeepSpeed (ZeRO-3 partitions; ZeRO-1/2 allocate the model
    once, on the device) and FSDP2 (shards allocated after sharding, fsdp.py note 2). One process and DDP take a
    built, initialised model."""
    return cfg.parallel.pp > 1 or cfg.parallel.engine in ("deepspeed", "fsdp")


# ---- the steps, in order ---------------------------------------------------------------------------------------
def stage_plan(ctx: BuildContext) -> StagePlan:
    """Which stages this rank holds, of how many, and the whole layout (parallel.pp_schedule)."""
    p = ctx.cfg.parallel
    n_stages, layout = pipeline_layout(p.pp_schedule, ctx.mesh.pp, p.pp_stages_per_rank, p.pp_schedule_csv)
    return StagePlan(layout[ctx.mesh.pp_rank], n_stages, layout)


def apply_pipeline_split(model: torch.nn.Module, plan: StagePlan) -> list[torch.nn.Module]:
    """1. This rank's stages as modules of their own, pruned to the stage (torchtitan's `pipeline_module_split`): a
    deep copy of the stage's view of the skeleton, so only the stage's modules are copied (nothing, on meta) and
    materialising a stage never touches the plain model or another stage."""
    return [copy.deepcopy(cut_stage(model, s, plan.n_stages)) for s in plan.stage_ids]


def apply_recompute(module: torch.nn.Module, ctx: BuildContext) -> None:
    """3. Recomputation (parallel.recompute) planned on this module's own sites: a stage never recomputes across its
    boundary."""
    recompute_module(module, ctx.cfg.parallel.recompute, ctx.cfg.parallel.recompute_block)


def apply_compile(module: torch.nn.Module, ctx: BuildContext) -> None:
    """4. `train.compile`: torch.compile per block, in place (`parallel/compile.py`), after recompute (under a
    recompute runner each block's F is compiled) and before sharding. FSDP and ZeRO-3 train a copy of the plain
    model: they compile their copy (the `compile` flag below), since a copy of a compiled module calls the original."""
    if ctx.cfg.train.compile:
        compile_blocks(module)


def apply_fsdp(module: torch.nn.Module, ctx: BuildContext, per_block: bool, under_pipeline: bool = False):
    """5. FSDP2 over the mesh's data-parallel dims (HSDP with dp_replicate > 1). Under a pipeline with dp > 1 the
    units stay gathered from a micro-batch's forward to its backward (reshard_after_forward=False: no second
    all-gather); over a one-rank mesh (a pipeline at dp = 1, sharded only for its bf16 compute weights) a "gather"
    is a local cast, so the units reshard after each forward and hold no weight copy between forward and backward,
    except under a split backward, whose weight step reads the parameters registered when its input step ran."""
    split = ctx.cfg.parallel.pp_schedule in SPLIT_BACKWARD_SCHEDULES  # its weight backward needs them registered
    keep_gathered = under_pipeline and (ctx.mesh.dp > 1 or split)
    return shard(module, ctx.mesh.dp_mesh(), per_block, compute_dtype=ctx.amp,
                 reshard_after_forward=not keep_gathered)  # fmt: skip


def stage_fsdp(ctx: BuildContext) -> tuple[bool, bool]:
    """(whether a pipeline's stages are sharded with FSDP2, whether per block). Sharded over their data-parallel
    ranks (dp > 1), and at dp = 1 too under bf16 autocast, over a one-rank mesh, for the bf16 compute weights alone:
    fp32 master shards, fp32 gradient reduction, the coefficient path fp32 (fsdp.py note 3), instead of autocast's
    bf16 copies of the fp32 weights, which it keeps for backward. Per block under 1F1B / interleaved 1F1B, and under
    the split-backward schedules in bf16 (their units kept gathered from forward to backward); one fp32 unit per
    stage under a split backward in fp32 and under a CSV schedule (which is sharded only at dp > 1)."""
    p = ctx.cfg.parallel
    per_block = p.pp_schedule in PER_BLOCK_FSDP_SCHEDULES or (
        ctx.amp is not None and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    )
    return ctx.mesh.dp > 1 or (ctx.amp is not None and per_block), per_block


def apply_materialise(module: torch.nn.Module, ctx: BuildContext) -> None:
    """6. Allocate what this rank holds of a module built on meta on its device, from the seed (values identical to
    one process: each module draws from its own generator) or from the checkpoint's weights."""
    if on_meta(module):
        materialise(module, ctx.device, ctx.seed, ctx.weights)


# ---- per layout ------------------------------------------------------------------------------------------------
def pipeline_stages(model: torch.nn.Module, ctx: BuildContext, plan: StagePlan) -> list[torch.nn.Module]:
    """Steps 1-5 of a pipeline rank: its stages cut, recomputing, compiled and (dp > 1) sharded, still on the meta
    device when `model` is (nothing allocated: `mhc-train plan` reads what each rank will hold from here)."""
    stages = apply_pipeline_split(model, plan)  # 1.
    for stage in stages:  # 2. tensor + sequence parallelism on each stage, expert parallelism (parallel.ep > 1)
        if ctx.mesh.tp > 1:
            apply_tp(stage, ctx.mesh.tp_mesh())
        apply_ep(stage, ctx)  # the experts over the stage's data-parallel ranks when FSDP shards it (5.)
    for stage in stages:
        apply_recompute(stage, ctx)  # 3.
        apply_compile(stage, ctx)  # 4.
    sharded, per_block = stage_fsdp(ctx)
    if sharded:  # 5.
        stages = [apply_fsdp(stage, ctx, per_block, under_pipeline=True) for stage in stages]
    return stages


def sharded_modules(model: torch.nn.Module, ctx: BuildContext) -> tuple[list[torch.nn.Module], StagePlan | None]:
    """What this rank trains, built by the same steps as its engine up to sharding (1-5) and not materialised: the
    pipeline's stages, FSDP's sharded model (as FSDPEngine shards its copy), or the plain model (one process, DDP;
    DeepSpeed partitions inside its engine and is not covered). For `mhc-train plan` on a meta skeleton."""
    p = ctx.cfg.parallel
    if p.pp > 1:
        plan = stage_plan(ctx)
        return pipeline_stages(model, ctx, plan), plan
    if ctx.mesh.tp > 1:  # 2. (the engines apply it to their copy; the plan's skeleton is its own)
        apply_tp(model, ctx.mesh.tp_mesh())
    apply_ep(model, ctx)  # 2. (after tensor parallelism)
    apply_recompute(model, ctx)  # 3.
    if p.engine == "fsdp":
        return [apply_fsdp(model, ctx, per_block=True)], None  # 5.
    return [model], None


def pipeline_engine(model: torch.nn.Module, ctx: BuildContext) -> PipelineEngine:
    """This rank's part of a pipeline: cut, recompute, compile, shard (dp > 1), materialise, optimizer, schedule. The
    plain `model` ends on the meta device on every rank (rank 0 fills it on the host when a file checkpoint or an
    export asks for it: `PipelineEngine.full_model`)."""
    plan = stage_plan(ctx)
    stages = pipeline_stages(model, ctx, plan)  # 1.-5.
    for stage in stages:
        apply_materialise(stage, ctx)  # 6.
    if not on_meta(model):  # a built model handed over: the stages are copies, the plain view is not kept
        model.to(torch.device("meta"))
    optimizer = ctx.make_optimizer(torch.nn.ModuleList(stages))  # 7.
    return PipelineEngine(model, stages, optimizer, ctx, plan)  # 8.


def data_parallel_engine(model: torch.nn.Module, ctx: BuildContext) -> Engine:
    """One process, DDP, FSDP2 / HSDP or DeepSpeed over the whole model: recompute, compile, then the engine."""
    p, t = ctx.cfg.parallel, ctx.cfg.train
    apply_ep(model, ctx)  # 2.
    apply_recompute(model, ctx)  # 3.
    if ctx.mesh.tp > 1 and p.engine == "none":  # 2. on the copy it trains, then 4.
        return TPEngine(model, ctx, compile_blocks if t.compile else None)
    if p.engine in ("none", "ddp"):  # FSDP and DeepSpeed compile the copy they train (apply_compile's note)
        apply_compile(model, ctx)  # 4.
    common = dict(dist=ctx.dist, device=ctx.device, grad_clip=ctx.cfg.optim.grad_clip, autocast_dtype=ctx.amp,
                  grad_accum=t.grad_accum)  # fmt: skip
    if p.engine == "deepspeed":  # 5.-8. inside DeepSpeed
        return DeepSpeedEngine(
            model, ctx.make_optimizer, ctx.make_scheduler, **common, zero_stage=p.zero_stage,
            micro_batch=t.batch_size // ctx.dist.world, config_file=p.deepspeed_config, compile=t.compile,
            seed=ctx.seed, weights=ctx.weights, zero=p.zero,
        )  # fmt: skip
    if p.engine == "fsdp":  # 5.-8. in FSDPEngine (shard on meta, materialise the shards, optimizer)
        fsdp_engine = TPFSDPEngine if ctx.mesh.tp > 1 else FSDPEngine  # 2. inside, on the copy it shards
        return fsdp_engine(model, ctx.make_optimizer, ctx.make_scheduler, **common, compile=t.compile, seed=ctx.seed,
                           weights=ctx.weights, mesh=ctx.mesh)  # fmt: skip
    optimizer = ctx.make_optimizer(model)  # 7.
    return LocalEngine(model, optimizer, ctx.make_scheduler(optimizer), **common, ddp=p.engine == "ddp")


# ---- entry points ----------------------------------------------------------------------------------------------
def build_engine(model: torch.nn.Module, cfg: Config, dist: DistInfo, weights: dict | None = None) -> Engine:
    """Apply `cfg.parallel` to the plain `model`: built on the meta device where `builds_on_meta(cfg)` (the engine
    allocates and fills what each rank trains, from `cfg.train.seed` or from `weights`), else built and initialised.
    `weights`: a full state dict by name to start from (a file checkpoint on resume), or None. `model` stays the
    plain full view for rank 0 (file checkpoints, export; for sharded or cut engines on `meta` until needed)."""
    use_fast_fp32_matmul(torch.device(dist.device))
    ctx = build_context(cfg, dist, weights)
    if weights is not None and not on_meta(model):
        model.load_state_dict(weights)
    if ctx.mesh.pp > 1:
        return pipeline_engine(model, ctx)
    return data_parallel_engine(model, ctx)


def build_pipeline(model: torch.nn.Module, cfg: Config, dist: DistInfo, pp: int | None = None) -> PipelineEngine:
    """A pipeline over `pp` ranks (parallel.pp; `scripts/bench_overlap.py` runs pp=1, both V stages on one
    device)."""
    return pipeline_engine(model, build_context(cfg, dist, pp=pp))
