"""Tensor-parallel config rules (`parallel.tp`, `parallel.cp`): what must divide by tp, what tp does not compose with
yet, and the data-parallel size world / (pp x tp) the launched world leaves. Called from `validate.py`."""

from __future__ import annotations

from mhc_train.config.schema import Config, ConfigError
from mhc_train.config.shapes import ffn_hidden_dim


def _fail(key: str, value, why: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {why}")


def validate_tp(cfg: Config) -> None:
    """Config-time rules of parallel.tp > 1 (sequence parallelism splits T, the plan splits heads, FFN and vocab)."""
    p, m = cfg.parallel, cfg.model
    if p.cp != 1:
        _fail("parallel.cp", p.cp, "context parallelism is not built (the mesh keeps its place): set parallel.cp=1")
    if p.tp < 1:
        _fail("parallel.tp", p.tp, "must be >= 1")
    if p.tp == 1:
        return
    if p.engine == "deepspeed":
        _fail("parallel.tp", p.tp, "DeepSpeed does not compose with tensor parallelism: use parallel.engine=fsdp")
    if p.engine == "ddp":
        _fail("parallel.tp", p.tp, "data parallelism with tensor parallelism is FSDP2: use parallel.engine=fsdp")
    if p.pp > 1 and p.pp_schedule not in ("1f1b", "interleaved1f1b"):
        _fail("parallel.pp_schedule", p.pp_schedule, "with tp > 1 is not built: use 1f1b or interleaved1f1b")
    if m.attention != "gqa" or m.ffn != "dense" or p.ep > 1:
        _fail("parallel.tp", p.tp, f"the tensor-parallel plan covers GQA attention and the dense FFN (this model: "
              f"attention={m.attention}, ffn={m.ffn}, parallel.ep={p.ep}): set parallel.tp=1")  # fmt: skip
    if m.tie_embeddings:
        _fail("parallel.tp", p.tp, "tied embeddings shard differently from the head: set model.tie_embeddings=false")
    kv = m.n_kv_head or m.n_head
    hidden = ffn_hidden_dim(m)
    for key, value in (("model.n_head", m.n_head), ("model.n_kv_head", kv), ("model.vocab_size", m.vocab_size),
                       ("model.ffn_hidden_dim", hidden), ("train.seq_len", cfg.train.seq_len)):  # fmt: skip
        if value % p.tp:
            _fail("parallel.tp", p.tp, f"must divide {key}={value} (heads, FFN, vocabulary and sequence are split)")


def data_parallel_world(cfg: Config, world: int) -> int:
    """The ranks left for data (and pipeline) parallelism, world / tp; refuses a world that tp does not divide."""
    tp = cfg.parallel.tp
    if world % tp:
        _fail("parallel.tp", tp, f"{world} ranks were launched: launch a multiple of pp x tp = {cfg.parallel.pp * tp}")
    return world // tp
