"""Every cross-field rule of a config, in one place; each raises `ConfigError` naming the key, the value and the fix.

- `validate(cfg)` checks a whole `Config`, the pipeline rules included (`validate_pipeline`, reading the schedule
  facts of pipeline.py), so a config validates the same whatever else was imported. It runs once per run, in
  `load_config`; `validate_model` / `validate_connection` run once more in `build_model`, for Python users who build a
  model without `load_config`; `validate_data` runs in `prepare`, which takes a `DataConfig` alone.
- `validate_world(cfg, world)` needs the launched world size, so the trainer calls it before the process group starts.
"""

from __future__ import annotations

from mhc_train.config.pipeline import read_csv_schedule
from mhc_train.config.recipe import validate_blend, validate_recipe
from mhc_train.config.rules import at_least, choice, fail
from mhc_train.config.schema import (
    ATTENTIONS,
    B_RES_INITS,
    BACKENDS,
    CHECKPOINT_FORMATS,
    COLLAPSES,
    CONNECTION_TYPES,
    DEVICES,
    ENGINES,
    H_RES_MODES,
    LR_SCHEDULES,
    NUMERICS,
    OUT_PROJ_INITS,
    PP_SCHEDULES,
    PRECISIONS,
    READ_INITS,
    RECOMPUTE_MODES,
    ROPE_SCALINGS,
    SINKHORN_BACKWARDS,
    SPLIT_BACKWARD_SCHEDULES,
    STREAM_DTYPES,
    WANDB_MODES,
    Config,
    ConfigError,
    ConnectionConfig,
    DataConfig,
    ModelConfig,
)
from mhc_train.config.validate_moe import validate_ep, validate_moe, validate_pp_ep  # noqa: F401 (re-exported)
from mhc_train.config.validate_tp import data_parallel_world, validate_tp


def validate_data(d: DataConfig) -> None:
    """The data.* checks, also run by `prepare` on a DataConfig built without a full Config."""
    if not 0 < d.val_fraction < 1:
        fail("data.val_fraction", d.val_fraction, "must be in (0, 1)")
    at_least("data.vocab_size", d.vocab_size, 16)
    at_least("data.num_workers", d.num_workers, 1)
    at_least("data.tokenizer_sample_lines", d.tokenizer_sample_lines, 1)
    at_least("data.shard_tokens", d.shard_tokens, 1024)
    choice("data.verify", d.verify, ("size", "digest"))
    validate_blend(d)
    validate_source_set(d)


def validate_source_set(d: DataConfig) -> None:
    """data.source left empty (configs/data/text_files.yaml leaves it for the user) without a blend: one line."""
    if not d.source.strip() and not d.blend:
        raise ConfigError(
            "data.source is not set: data=text_files trains on your own text; add data.source=<a txt/jsonl/parquet "
            "file, a directory or glob of them, or hf:<dataset>>"
        )


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    for key in ("vocab_size", "dim", "n_layer", "n_head", "max_seq_len", "multiple_of"):
        at_least(f"{prefix}.{key}", getattr(m, key), 1)
    at_least(f"{prefix}.n_kv_head", m.n_kv_head, 0)
    at_least(f"{prefix}.ffn_hidden_dim", m.ffn_hidden_dim, 0)
    at_least(f"{prefix}.head_dim", m.head_dim, 0)
    choice(f"{prefix}.stream_dtype", m.stream_dtype, STREAM_DTYPES)
    if not m.head_dim and m.dim % m.n_head:
        fail(f"{prefix}.n_head", m.n_head, f"must divide {prefix}.dim={m.dim} (or set {prefix}.head_dim)")
    if (m.head_dim or m.dim // m.n_head) % 2:
        fail(f"{prefix}.head_dim", m.head_dim or m.dim // m.n_head, "the head size must be even for RoPE")
    kv = m.n_kv_head or m.n_head
    if m.n_head % kv:
        fail(f"{prefix}.n_kv_head", m.n_kv_head, f"must divide {prefix}.n_head={m.n_head} (or be 0)")
    if not (m.norm_eps > 0 and m.init_std > 0 and m.rope_theta > 0):
        fail(f"{prefix}.norm_eps/init_std/rope_theta", (m.norm_eps, m.init_std, m.rope_theta), "must all be > 0")
    choice(f"{prefix}.rope_scaling", m.rope_scaling, ROPE_SCALINGS)
    if m.rope_scaling == "llama3" and not (
        m.rope_scaling_factor > 0 and m.rope_high_freq_factor > m.rope_low_freq_factor > 0
    ):
        fail(f"{prefix}.rope_high_freq_factor", m.rope_high_freq_factor,
             "needs rope_scaling_factor > 0 and rope_high_freq_factor > rope_low_freq_factor > 0")  # fmt: skip
    choice(f"{prefix}.attention", m.attention, ATTENTIONS)
    if m.attention == "mla":
        validate_mla(m, prefix)

    validate_moe(m, prefix)


def validate_mla(m: ModelConfig, prefix: str = "model") -> None:
    """model.mla.* (only when model.attention=mla; n_kv_head and head_dim are then unused)."""
    a = m.mla
    at_least(f"{prefix}.mla.q_lora_rank", a.q_lora_rank, 0)
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        at_least(f"{prefix}.mla.{key}", getattr(a, key), 1)
    at_least(f"{prefix}.mla.qk_rope_head_dim", a.qk_rope_head_dim, 2)
    if a.qk_rope_head_dim % 2:
        fail(f"{prefix}.mla.qk_rope_head_dim", a.qk_rope_head_dim, "must be even (RoPE rotates pairs)")


def validate_connection(c: ConnectionConfig, prefix: str = "connection") -> None:
    choice(f"{prefix}.type", c.type, CONNECTION_TYPES)
    choice(f"{prefix}.backend", c.backend, BACKENDS)
    at_least(f"{prefix}.n_streams", c.n_streams, 1)
    if c.type == "residual" and c.n_streams != 1:
        fail(f"{prefix}.n_streams", c.n_streams, "the residual baseline has exactly 1 stream; set it to 1")
    choice(f"{prefix}.hc_out_proj_init", c.hc_out_proj_init, OUT_PROJ_INITS)
    choice(f"{prefix}.h_res", c.h_res, H_RES_MODES)
    choice(f"{prefix}.b_res_init", c.b_res_init, B_RES_INITS)
    choice(f"{prefix}.read_init", c.read_init, READ_INITS)
    choice(f"{prefix}.sinkhorn_backward", c.sinkhorn_backward, SINKHORN_BACKWARDS)
    at_least(f"{prefix}.t_max", c.t_max, 1)
    if not c.eps > 0:
        fail(f"{prefix}.eps", c.eps, "must be > 0")
    if c.phi_init_std < 0 or c.hc_dynamic_scale_init < 0:
        fail(f"{prefix}.phi_init_std/hc_dynamic_scale_init", (c.phi_init_std, c.hc_dynamic_scale_init), "must be >= 0")
    validate_deepseek_forms(c, prefix)


def validate_deepseek_forms(c: ConnectionConfig, prefix: str = "connection") -> None:
    """connection.numerics / hc_eps / collapse (docs/mhc.md sections 8-9)."""
    choice(f"{prefix}.numerics", c.numerics, NUMERICS)
    choice(f"{prefix}.collapse", c.collapse, COLLAPSES)
    if c.hc_eps < 0:
        fail(f"{prefix}.hc_eps", c.hc_eps, "must be >= 0 (DeepSeek's default is 1e-6)")
    if c.type == "mhc_single_pass" and c.collapse != "sum":
        fail(
            f"{prefix}.collapse", c.collapse, "mhc_single_pass collapses with the last FFN site's mix; leave it at sum"
        )
    if c.type == "mhc_single_pass" and c.h_res != "sinkhorn":
        fail(f"{prefix}.h_res", c.h_res, "mhc_single_pass is built on the Sinkhorn H_res; set h_res=sinkhorn")
    if c.numerics == "deepseek_v4" and (c.type not in ("mhc", "mhc_single_pass") or c.h_res != "sinkhorn"):
        fail(f"{prefix}.numerics", c.numerics, "deepseek_v4 is mHC's arithmetic; it needs type=mhc, h_res=sinkhorn")
    if c.numerics == "deepseek_v4" and c.sinkhorn_backward != "unrolled":
        fail(
            f"{prefix}.sinkhorn_backward",
            c.sinkhorn_backward,
            "numerics=deepseek_v4 differentiates its unrolled iterates; set sinkhorn_backward=unrolled",
        )
    if c.collapse != "sum" and c.type == "residual":
        fail(f"{prefix}.collapse", c.collapse, "the residual baseline has one stream; keep collapse=sum")


def validate_single_pass(cfg: Config) -> None:
    """connection.type=mhc_single_pass against the rest of the run (model/single_pass.py's module docstring)."""
    if cfg.connection.type != "mhc_single_pass":
        return
    if cfg.model.stream_dtype != "fp32":
        fail(
            "model.stream_dtype", cfg.model.stream_dtype, "mhc_single_pass carries its read mix in the stream; use fp32"
        )


def validate(cfg: Config) -> None:
    """Every cross-field rule of a full run config, the pipeline's included; raises ConfigError on the first
    violation. `load_config` runs it; the launched world size is checked apart (`validate_world`)."""
    validate_model(cfg.model)
    validate_connection(cfg.connection)
    validate_single_pass(cfg)
    validate_ep(cfg)
    t, o, s = cfg.train, cfg.optim, cfg.schedule
    for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every"):
        at_least(f"train.{key}", getattr(t, key), 1)
    at_least("train.diag_every", t.diag_every, 0)
    at_least("train.stop_at_step", t.stop_at_step, 0)
    choice("train.precision", t.precision, PRECISIONS)
    if cfg.model.stream_dtype == "bf16" and t.precision == "fp32":
        fail("model.stream_dtype", "bf16", "bf16 streams need bf16 compute: set train.precision=bf16 (or auto on CUDA)")
    choice("train.device", t.device, DEVICES)
    if t.seq_len > cfg.model.max_seq_len:
        fail("train.seq_len", t.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if not o.lr > 0:
        fail("optim.lr", o.lr, "must be > 0")
    if o.weight_decay < 0 or o.grad_clip < 0:
        fail("optim.weight_decay/grad_clip", (o.weight_decay, o.grad_clip), "must be >= 0")
    if o.connection_lr_mult < 0:
        fail("optim.connection_lr_mult", o.connection_lr_mult, "must be >= 0 (0 freezes the connection parameters)")
    at_least("optim.connection_warmup_steps", o.connection_warmup_steps, 0)
    choice("schedule.name", s.name, LR_SCHEDULES)
    at_least("schedule.warmup_steps", s.warmup_steps, 0)
    if len(s.step_milestones) != len(s.step_factors):
        fail("schedule.step_factors", list(s.step_factors), "needs one factor per schedule.step_milestones entry")
    if list(s.step_milestones) != sorted(s.step_milestones) or any(not 0 < m < 1 for m in s.step_milestones):
        fail("schedule.step_milestones", list(s.step_milestones), "must be increasing fractions in (0, 1)")
    if not 0 <= s.min_lr_ratio <= 1:
        fail("schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
    validate_recipe(cfg)
    at_least("checkpoint.every", cfg.checkpoint.every, 0)
    at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1)
    choice("checkpoint.format", cfg.checkpoint.format, CHECKPOINT_FORMATS)
    if cfg.parallel.engine == "deepspeed" and cfg.checkpoint.format == "dcp":
        fail("checkpoint.format", "dcp", "parallel.engine=deepspeed writes its own sharded checkpoints: use auto")
    validate_async_save(cfg)
    validate_zero(cfg.parallel.zero)
    validate_tp(cfg)
    choice("parallel.recompute", cfg.parallel.recompute, RECOMPUTE_MODES)
    choice("parallel.engine", cfg.parallel.engine, ENGINES)
    at_least("parallel.pp", cfg.parallel.pp, 1)
    choice("parallel.pp_schedule", cfg.parallel.pp_schedule, PP_SCHEDULES)
    at_least("parallel.timeout_s", cfg.parallel.timeout_s, 1)
    at_least("parallel.dp_replicate", cfg.parallel.dp_replicate, 1)
    if cfg.parallel.dp_replicate > 1 and cfg.parallel.engine != "fsdp":
        fail("parallel.dp_replicate", cfg.parallel.dp_replicate, "replicas of shards (HSDP) need parallel.engine=fsdp")
    if cfg.parallel.zero_stage not in (1, 2, 3):
        fail("parallel.zero_stage", cfg.parallel.zero_stage, "allowed values are 1, 2, 3")
    p = cfg.parallel
    if p.engine == "deepspeed" and p.zero_stage == 3 and p.recompute != "none":
        fail(
            "parallel.recompute",
            p.recompute,
            "ZeRO-3 gathers a module's partitioned parameters only inside that module's forward, and recomputation "
            "re-runs the sites inside the backward, outside it: use recompute=none with zero_stage=3, or "
            "parallel.engine=fsdp (parameters sharded too) with recompute=mhc or full",
        )
    if cfg.parallel.engine == "deepspeed" and t.skip_nonfinite:
        fail("train.skip_nonfinite", True, "is not supported with parallel.engine=deepspeed (it always steps)")
    block = str(cfg.parallel.recompute_block)
    if block not in ("auto", "stage") and not (block.isdigit() and int(block) >= 1):
        fail("parallel.recompute_block", block, "must be a positive number of connection sites, auto or stage")
    choice("logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    validate_data(cfg.data)
    validate_pipeline(cfg)


def validate_async_save(cfg: Config) -> None:
    """checkpoint.async_save writes DCP shards in the background: the run's checkpoints must be DCP."""
    ck, p = cfg.checkpoint, cfg.parallel
    dcp = ck.format == "dcp" or (ck.format == "auto" and p.engine != "deepspeed" and (p.engine == "fsdp" or p.pp > 1))
    if ck.async_save and not dcp:
        fail(
            "checkpoint.async_save", True, "applies to DCP checkpoints: set checkpoint.format=dcp (not with deepspeed)"
        )


def validate_zero(z) -> None:
    """parallel.zero: DeepSpeed's overlap switch and bucket sizes (elements)."""
    choice("parallel.zero.overlap_comm", str(z.overlap_comm).lower(), ("auto", "on", "off", "true", "false"))
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        at_least(f"parallel.zero.{key}", getattr(z, key), 1)
    for key in ("stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
        at_least(f"parallel.zero.{key}", getattr(z, key), 0)


def validate_pipeline(cfg: Config) -> None:
    """A pipeline's rules (parallel.pp > 1): micro-batch counts per schedule, stages dividing the layers, and what a
    pipeline cannot combine with."""
    p, t = cfg.parallel, cfg.train
    if p.pp == 1:
        return
    m = p.pp_microbatches or 2 * p.pp
    split = p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    if p.pp_schedule == "csv":
        if not p.pp_schedule_csv:
            fail("parallel.pp_schedule_csv", "", "pp_schedule=csv needs the path of a schedule file")
        try:
            stages, _, file_mbs, split = read_csv_schedule(p.pp_schedule_csv, p.pp)
        except ValueError as e:
            fail("parallel.pp_schedule_csv", p.pp_schedule_csv, str(e))
        if file_mbs != m:
            fail(
                "parallel.pp_microbatches",
                m,
                f"the schedule file {p.pp_schedule_csv} runs {file_mbs} micro-batches: set pp_microbatches={file_mbs}",
            )
    elif p.pp_schedule == "interleaved1f1b":
        at_least("parallel.pp_stages_per_rank", p.pp_stages_per_rank or 2, 2)
        stages = p.pp * (p.pp_stages_per_rank or 2)
        rounds = max(1, m // p.pp)
        if m < p.pp or m % rounds:
            fail(
                "parallel.pp_microbatches",
                m,
                f"interleaved1f1b on {p.pp} ranks needs at least {p.pp} micro-batches and a count that "
                f"max(1, m // pp) divides (e.g. a multiple of {p.pp})",
            )
    else:
        stages = p.pp * (1 if p.pp_schedule == "1f1b" else 2)
        need = p.pp if p.pp_schedule == "1f1b" else 2 * p.pp
        if m < need:
            fail("parallel.pp_microbatches", m, f"{p.pp_schedule} on {p.pp} ranks needs at least {need} micro-batches")
    if cfg.model.n_layer % stages:
        fail(
            "parallel.pp",
            p.pp,
            f"{p.pp_schedule} needs model.n_layer={cfg.model.n_layer} divisible by its "
            f"{stages} stages; pick pp (or n_layer) so that it divides",
        )
    if t.batch_size % m:
        fail("parallel.pp_microbatches", m, f"must split train.batch_size={t.batch_size} evenly")
    if p.engine == "deepspeed":
        fail(
            "parallel.engine",
            p.engine,
            "pipeline runs use torch.distributed.pipelining: set parallel.engine=none (pipeline only) or fsdp "
            "(pipeline x FSDP2 data parallel); DeepSpeed reduces gradients inside its own backward, which a "
            "pipeline schedule bypasses",
        )
    if p.engine == "ddp":
        fail(
            "parallel.engine",
            p.engine,
            "with a pipeline, data parallelism is FSDP2 per stage: set parallel.engine=fsdp (DDP's gradient hooks "
            "do not fire under the split-backward schedules), or none for a pipeline alone",
        )
    if t.grad_accum != 1:
        fail("train.grad_accum", t.grad_accum, "must be 1 with a pipeline: raise parallel.pp_microbatches instead")
    if split and t.compile:
        fail("train.compile", True, f"{p.pp_schedule} splits the backward and refuses compiled stages; use 1f1b")
    if cfg.model.tie_embeddings:
        fail("model.tie_embeddings", True, "the embedding and the head live on different pipeline stages")
    if t.skip_nonfinite:
        fail("train.skip_nonfinite", True, "is not supported with a pipeline yet")


def validate_world(cfg: Config, world: int) -> None:
    """Rules that need the launched world size; the trainer runs them before the process group starts."""
    p = cfg.parallel
    world = data_parallel_world(cfg, world)  # the rules below count data-parallel (and pipeline) ranks
    validate_ep(cfg, world)
    if p.dp_replicate > 1 and world % (p.pp * p.dp_replicate):
        fail(
            "parallel.dp_replicate",
            p.dp_replicate,
            f"{world} ranks were launched: launch a multiple of pp x dp_replicate = {p.pp * p.dp_replicate}",
        )
    if p.pp > 1:
        if world % p.pp:
            fail("parallel.pp", p.pp, f"{world} ranks were launched: launch a multiple of pp={p.pp} (pp x dp ranks)")
        dp = world // p.pp
        if dp > 1 and p.engine != "fsdp":
            fail(
                "parallel.engine",
                p.engine,
                f"{world} ranks with pp={p.pp} make {dp} pipeline replicas: set parallel.engine=fsdp to train them "
                f"data-parallel, or launch exactly pp={p.pp} ranks",
            )
        m = p.pp_microbatches or 2 * p.pp
        if cfg.train.batch_size % (dp * m):
            fail(
                "train.batch_size",
                cfg.train.batch_size,
                f"must split over {dp} pipeline replicas x {m} micro-batches; use a multiple of {dp * m}",
            )
        return
    if world > 1 and p.engine == "none":
        fail("parallel.engine", "none", f"{world} ranks were launched: set parallel.engine=ddp, fsdp or deepspeed")
    if cfg.train.batch_size % world:
        fail(
            "train.batch_size",
            cfg.train.batch_size,
            f"the global batch must split evenly over {world} data-parallel ranks; use a multiple of {world}",
        )


def validate_launch(cfg: Config, environ) -> None:
    """A data-parallel engine needs the environment a launcher sets (torchrun, the deepspeed launcher, srun through
    scripts/slurm): without RANK there is no process group to join, and each engine would fail in its own way."""
    engine = cfg.parallel.engine
    if engine != "none" and "RANK" not in environ:
        fail(
            "parallel.engine",
            engine,
            "needs a distributed launch and this process was started without one (no RANK in the environment): "
            "run `torchrun --nproc_per_node=N -m mhc_train.train ...` (N ranks), or parallel=single for one process",
        )
