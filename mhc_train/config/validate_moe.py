"""Mixture-of-experts config rules: `model.ffn` / `model.moe.*` (`validate_moe`) and expert parallelism
(`validate_ep`: its engine, model and layout, ep dividing the data-parallel size; `validate_pp_ep`: inside pipeline
stages, ep = each stage's data-parallel size). Each refusal names the fix on one line. Called from `validate.py`
(and by `parallel/expert_parallel.apply_ep` with the launched world)."""

from __future__ import annotations

from mhc_train.config.rules import at_least, choice, fail
from mhc_train.config.schema import FFN_TYPES, Config, ModelConfig


def validate_moe(m: ModelConfig, prefix: str = "model") -> None:
    """model.ffn and, for ffn=moe, model.moe.*."""
    choice(f"{prefix}.ffn", m.ffn, FFN_TYPES)
    if m.ffn != "moe":
        return
    e, key = m.moe, f"{prefix}.moe"
    at_least(f"{key}.n_routed_experts", e.n_routed_experts, 1)
    for name in ("n_shared_experts", "expert_hidden_dim", "first_k_dense"):
        at_least(f"{key}.{name}", getattr(e, name), 0)
    at_least(f"{key}.top_k", e.top_k, 1)
    if e.top_k > e.n_routed_experts:
        fail(f"{key}.top_k", e.top_k, f"a token picks at most {key}.n_routed_experts={e.n_routed_experts}; lower it")
    for name in ("route_scale", "bias_update_rate", "seq_aux_loss_coef", "capacity_factor"):
        at_least(f"{key}.{name}", getattr(e, name), 0, (int, float))
    if not e.route_scale > 0:
        fail(f"{key}.route_scale", e.route_scale, "must be > 0")


def validate_ep(cfg: Config, world: int | None = None) -> None:
    """parallel.ep (expert parallelism): its engine, model and (with `world`) layout; each refusal names the fix."""
    p, m = cfg.parallel, cfg.model
    at_least("parallel.ep", p.ep, 1)
    if m.ffn == "moe" and p.engine == "deepspeed":
        fail("model.ffn", m.ffn, "MoE balancing is not wired into parallel.engine=deepspeed: use fsdp or ddp")
    if p.ep == 1:
        return
    if p.engine != "fsdp":
        fail("parallel.ep", p.ep, f"expert parallelism needs parallel.engine=fsdp (got {p.engine}); or set ep=1")
    if m.ffn != "moe":
        fail("parallel.ep", p.ep, f"shards experts, but model.ffn={m.ffn}: set model.ffn=moe, or ep=1")
    if m.moe.n_routed_experts % p.ep:
        fail("parallel.ep", p.ep, f"must divide model.moe.n_routed_experts={m.moe.n_routed_experts}")
    if p.pp > 1 and p.dp_replicate == 1:  # expert parallelism inside pipeline stages
        return validate_pp_ep(cfg, world)
    if p.pp > 1:
        fail(
            "parallel.ep",
            p.ep,
            "runs in pipeline stages without dp_replicate so far; set parallel.dp_replicate=1, or ep=1",
        )
    if world is not None and world % (p.ep * p.dp_replicate):
        shard = f"{world} ranks / dp_replicate={p.dp_replicate}" if p.dp_replicate > 1 else f"{world} ranks launched"
        fail("parallel.ep", p.ep, f"must divide the data-parallel size ({shard}); set ep to a divisor")


def validate_pp_ep(cfg: Config, world: int | None = None) -> None:
    """Expert parallelism inside pipeline stages (pp > 1, ep > 1): the experts are laid out over each stage's
    data-parallel ranks, so ep must equal them (world / pp, `world` counting data-parallel and pipeline ranks), and
    tensor parallelism is not combined with it yet."""
    p = cfg.parallel
    if p.tp > 1:
        fail("parallel.ep", p.ep, f"runs in pipeline stages without tensor parallelism so far (tp={p.tp}): set tp=1")
    if world is not None and world % p.pp == 0 and p.ep != world // p.pp:
        fail("parallel.ep", p.ep, f"must equal each stage's data-parallel size ({world} ranks / pp={p.pp}) so far; "
             f"set ep={world // p.pp}")  # fmt: skip
