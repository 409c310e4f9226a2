"""Mixture-of-experts across ranks: the balancing bias's global load, and expert parallelism (parallel.ep).

Balancing: every MoE layer counts the tokens its router sends to each expert during the step's forwards
(`MoE.load_stats`); after the optimizer step the engine calls `balance_experts`, which sums the counts of every
layer over all ranks in one all-reduce (data-parallel replicas, expert-parallel ranks and pipeline stages alike: a
layer's row is zero on ranks that do not hold it) and applies each layer's bias update on every rank, so the bias,
like a weight, is the same on every replica.

Expert parallelism (torchtitan's layout; ep = the FSDP data-parallel size here, ep below it in expert_layout.py;
under a pipeline, ep = each stage's data-parallel size, `build.pipeline_stages` applying it per stage and
`PipelineEngine` scaling the gradients):
- `apply_ep(model, ctx)` (build step 2) installs `AllToAllDispatch` as every MoE layer's dispatch / combine;
- FSDP2 (`fsdp.shard`) then lays each layer's stacked expert weights out as DTensors `Shard(0)` over the
  data-parallel mesh (`distribute_experts`: rank r holds experts [r E/ep, (r+1) E/ep)) and leaves them out of its
  units; the other parameters are FSDP-sharded as before;
- each MoE forward sends its expert-sorted rows to the ranks holding their experts by one `all_to_all_single` with
  uneven splits (the counts go first, by a small all-to-all), the local experts run as one grouped matmul, and a
  second all-to-all brings the outputs back (its backward is the reverse exchange: `dist.all_to_all_uneven`);
- an expert's gradient arrives summed over the ranks whose tokens it served; `scale_expert_grads` divides it by the
  data-parallel size once per step (FSDP averages the others), which makes it the global mean loss's gradient.
A model whose expert weights are whole (rank 0's plain view, one process) keeps the local path.
"""

from __future__ import annotations

import torch

from mhc_train.config.validate import validate_ep
from mhc_train.model.moe import STATS, MoE, moe_modules
from mhc_train.parallel.dist import all_reduce_sum_, all_to_all_equal, all_to_all_uneven, gather_dicts
from mhc_train.parallel.expert_layout import EP_GRAD_DIVISOR, ep_group, set_expert_layout, shard_experts_below_dp

EP_PARAM = "_mhc_expert_parallel"  # set on the experts modules whose weights `distribute_experts` laid out


# ---- balancing ---------------------------------------------------------------------------------------------------
def _layer_id(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


def balance_experts(modules, dist, model_cfg) -> None:
    """After an optimizer step of an MoE model (`model_cfg.ffn == "moe"`): every MoE layer's load summed over the
    global batch (one all-reduce of [n_layer, E + 3] float64 where world > 1, joined by every rank, also one whose
    pipeline stage holds no MoE layer), then each layer's bias update. No host read."""
    if model_cfg.ffn != "moe":
        return
    layers = [(name, m) for mod in modules for name, m in moe_modules(mod)]
    device = layers[0][1].load_stats.device if layers else dist.device
    table = torch.zeros(model_cfg.n_layer, model_cfg.moe.n_routed_experts + STATS, dtype=torch.float64, device=device)
    for name, m in layers:
        table[_layer_id(name)] = m.load_stats
    all_reduce_sum_(table, dist)
    for name, m in layers:
        m.apply_balance(table[_layer_id(name)])


def reset_counts(modules) -> None:
    """Drop a skipped step's counts."""
    for mod in modules:
        for _, m in moe_modules(mod):
            m.load_stats.zero_()


def moe_metrics(modules, dist) -> dict:
    """{layer index: that layer's `balance_metrics`} on rank 0 ({} elsewhere; empty without MoE). A collective
    where world > 1."""
    local = {str(_layer_id(n)): m.balance_metrics() for mod in modules for n, m in moe_modules(mod)}
    return dict(sorted(gather_dicts(local, dist).items(), key=lambda kv: int(kv[0])))


# ---- expert parallelism ------------------------------------------------------------------------------------------
class AllToAllDispatch:
    """`MoE.dispatch` / `combine` over the ranks holding the experts (the mesh of the expert weights' DTensor)."""

    def dispatch(self, moe: MoE, x: torch.Tensor, counts: torch.Tensor):
        w = moe.experts.w1
        if not hasattr(w, "device_mesh"):  # whole weights: the local path
            return x, counts, None
        group, ep = ep_group(moe.experts)
        send = counts.view(ep, -1)  # [ep, E_local]: what goes to each rank, per its local expert
        recv = all_to_all_equal(send, group, tag="dispatch_counts")  # [ep (source), E_local]
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        got = all_to_all_uneven(x, recv_splits, send_splits, group, tag="dispatch")  # [sum recv, C]: by source
        expert = torch.arange(recv.shape[1], device=x.device).repeat(ep).repeat_interleave(recv.flatten())
        order = torch.argsort(expert, stable=True)  # rows by local expert, source order within
        return got[order], recv.sum(0), (order, send_splits, recv_splits, group)

    def combine(self, moe: MoE, y: torch.Tensor, handle) -> torch.Tensor:
        if handle is None:
            return y
        order, send_splits, recv_splits, group = handle
        back = torch.empty_like(y).index_copy(0, order, y)  # undo the sort: by source again
        return all_to_all_uneven(back, send_splits, recv_splits, group, tag="combine")


def apply_ep(model: torch.nn.Module, ctx) -> None:
    """2. Expert parallelism (parallel.ep > 1): every MoE layer dispatches by all-to-all; the expert weights are
    laid out over the ranks when FSDP shards the model (`distribute_experts`)."""
    if ctx.cfg.parallel.ep == 1:
        return
    validate_ep(ctx.cfg, ctx.dist.world)
    for _, m in moe_modules(model):
        m.use_dispatch(AllToAllDispatch())
    set_expert_layout(model, ctx.mesh)  # ep below dp: the experts' own meshes (expert_layout.py)


def distribute_experts(module: torch.nn.Module, mesh, compute_dtype=None) -> set:
    """Lay out the expert weights of every MoE layer that dispatches by all-to-all as DTensors Shard(0) over `mesh`
    (the 1-D data-parallel mesh, of size ep; the experts module is marked `EP_PARAM`); returns them (FSDP leaves
    them out). Below dp the experts become their own FSDP unit instead (`shard_experts_below_dp`), gathered in
    `compute_dtype` (bf16 under train.precision=bf16 with per-block units, as the blocks are) with fp32 reductions."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = set()
    for _, m in moe_modules(module):
        if (
            not isinstance(m._dispatcher, AllToAllDispatch)
            or shard_experts_below_dp(m, EP_PARAM, compute_dtype)
            or mesh.ndim != 1
        ):
            continue
        if not getattr(m.experts, EP_PARAM, False):
            for key, p in list(m.experts.named_parameters(recurse=False)):
                d = distribute_tensor(p.data, mesh, [Shard(0)], src_data_rank=None)
                setattr(m.experts, key, torch.nn.Parameter(d))
            setattr(m.experts, EP_PARAM, True)
        out.update(m.experts.parameters())
    return out


def scale_expert_grads(module: torch.nn.Module, dp: int) -> None:
    """Once per step, after the last backward: the experts' gradients (sums over the ranks they served) / dp (/ ep
    where FSDP2 averaged them over the rest of dp: expert_layout.py)."""
    for _, m in moe_modules(module):
        if getattr(m.experts, EP_PARAM, False):
            for p in m.experts.parameters():
                if p.grad is not None:
                    p.grad.div_(getattr(m.experts, EP_GRAD_DIVISOR, dp))
