"""`build_engine`: parallelism applied to a plain model, in one fixed order, and the only place that knows the engine
kinds (torchtitan's order: cut pipeline stages, apply recomputation, shard or wrap for data parallelism, build the
schedule).

    parallel.pp > 1        cut this rank's stages -> recompute per stage -> FSDP2 per stage (dp > 1) -> schedule
    parallel.engine=none   recompute -> the plain model              (one process)
    parallel.engine=ddp    recompute -> DistributedDataParallel
    parallel.engine=fsdp   recompute -> FSDP2 over all ranks
    parallel.engine=deepspeed  recompute -> DeepSpeed ZeRO 1/2/3
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from mhc_train.config import Config, ConfigError
from mhc_train.optim import build_optimizer, build_scheduler
from mhc_train.parallel.data_parallel import DeepSpeedEngine
from mhc_train.parallel.dist import DistInfo
from mhc_train.parallel.engine import Engine, LocalEngine, release_eval_copy
from mhc_train.parallel.fsdp import FSDPEngine, shard
from mhc_train.parallel.pipeline import PipelineEngine, cut_stage, pipeline_mesh
from mhc_train.parallel.recompute import apply_recompute
from mhc_train.parallel.schedules import pipeline_layout
from mhc_train.parallel.state import on_meta

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


def builds_on_meta(cfg: Config) -> bool:
    """Whether `build_engine` wants the plain model built on the meta device (it then allocates and fills only what
    each rank trains): DeepSpeed (ZeRO-3 partitions; ZeRO-1/2 allocate the model once, on the device) and FSDP2
    (shards allocated after sharding, fsdp.py note 2). One process, DDP and the pipeline take a built, initialised
    model."""
    return cfg.parallel.pp == 1 and cfg.parallel.engine in ("deepspeed", "fsdp")


def build_pipeline(model: torch.nn.Module, cfg: Config, dist: DistInfo, pp: int | None = None) -> PipelineEngine:
    """This rank's part of a pipeline over `pp` ranks (parallel.pp; `scripts/bench_overlap.py` runs pp=1, both V
    stages on one device): cut the stages, recompute per stage, FSDP2 per stage (dp > 1), then the schedule."""
    p = cfg.parallel
    mesh = pipeline_mesh(dist, pp or p.pp)
    n_stages, layout = pipeline_layout(p.pp_schedule, mesh.pp, p.pp_stages_per_rank, p.pp_schedule_csv)
    ids = layout[mesh.pp_rank]
    source = copy.deepcopy(model) if mesh.dp > 1 else model  # FSDP must not shard rank 0's eval model
    stages = [cut_stage(source, s, n_stages) for s in ids]  # 1. cut
    for stage in stages:  # 2. recompute: blocks never cross a stage, each stage is planned on its own sites
        apply_recompute(stage, p.recompute, p.recompute_block)
    amp = autocast_dtype(cfg.train.precision, dist.device)
    if mesh.dp > 1:  # 3. shard each stage over its data-parallel group
        per_block = p.pp_schedule in PER_BLOCK_FSDP_SCHEDULES
        stages = [shard(stage, mesh.dp_mesh, per_block, compute_dtype=amp) for stage in stages]
        release_eval_copy(model, dist)
    return PipelineEngine(  # 4. schedule
        model,
        stages,
        ids,
        n_stages,
        mesh,
        p.pp_schedule,
        p.pp_microbatches or 2 * mesh.pp,
        partial(build_optimizer, cfg=cfg.optim),
        partial(build_scheduler, total=cfg.train.max_steps, cfg=cfg.schedule),
        dist,
        cfg.optim.grad_clip,
        csv_path=p.pp_schedule_csv,
        overlap=p.pp_overlap,
        autocast_dtype=amp,
        layout=layout,
    )


def build_engine(model: torch.nn.Module, cfg: Config, dist: DistInfo, weights: dict | None = None) -> Engine:
    """Apply `cfg.parallel` to the plain `model`: built on the meta device where `builds_on_meta(cfg)` (the engine
    allocates and fills what each rank trains, from `cfg.train.seed` or from `weights`), else built and initialised.
    `weights`: a full state dict by name to start from (a file checkpoint on resume), or None. `model` stays the
    plain full view for rank 0 (file checkpoints, export; for sharded engines on `meta` until needed)."""
    p, t = cfg.parallel, cfg.train
    use_fast_fp32_matmul(dist.device)
    amp = autocast_dtype(t.precision, dist.device)
    if cfg.model.stream_dtype == "bf16" and amp is None:
        raise ConfigError(
            f"model.stream_dtype='bf16' needs bf16 compute, but train.precision={t.precision!r} runs fp32 on "
            f"{dist.device.type}: set train.precision=bf16, or model.stream_dtype=fp32"
        )
    if weights is not None and not on_meta(model):
        model.load_state_dict(weights)
    if p.pp > 1:
        return build_pipeline(model, cfg, dist)
    make_optimizer = partial(build_optimizer, cfg=cfg.optim)  # engines build them on the modules they train
    make_scheduler = partial(build_scheduler, total=t.max_steps, cfg=cfg.schedule)
    apply_recompute(model, p.recompute, p.recompute_block)
    common = dict(dist=dist, device=dist.device, grad_clip=cfg.optim.grad_clip, autocast_dtype=amp,
                  grad_accum=t.grad_accum)  # fmt: skip
    if p.engine == "deepspeed":
        micro = t.batch_size // dist.world
        return DeepSpeedEngine(
            model, make_optimizer, make_scheduler, **common, zero_stage=p.zero_stage, micro_batch=micro,
            config_file=p.deepspeed_config, compile=t.compile, seed=t.seed, weights=weights,
        )  # fmt: skip
    if p.engine == "fsdp":
        return FSDPEngine(model, make_optimizer, make_scheduler, **common, compile=t.compile, seed=t.seed,
                          weights=weights)  # fmt: skip
    optimizer = make_optimizer(model)
    return LocalEngine(model, optimizer, make_scheduler(optimizer), **common, ddp=p.engine == "ddp", compile=t.compile)
