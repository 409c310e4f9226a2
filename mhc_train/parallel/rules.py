"""Config rules that need the parallel layer's knowledge (schedule files, the launched world size).

`mhc_train.config` imports nothing of mhc_train; this module registers these rules with it (`register_rules`) when
`mhc_train.parallel` is imported, which the trainer always does, so `config.validate` / `config.validate_world` run
them there.
"""

from __future__ import annotations

from mhc_train.config import SPLIT_BACKWARD_SCHEDULES, Config, at_least, fail, register_rules
from mhc_train.parallel.schedules import read_csv_schedule


def validate_pipeline(cfg: Config) -> None:
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
    """Rules that need the launched world size; `config.validate_world` runs them before the process group starts."""
    p = cfg.parallel
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


register_rules(validate_pipeline, validate_world)
