"""DeepSeek-V3-style mixture-of-experts FFN: fine-grained routed SwiGLU experts, shared experts, and
auxiliary-loss-free load balancing (model.ffn=moe, settings model.moe.*).

Axis legend: N tokens (B*T), C channels, E routed experts, k experts per token, H one expert's hidden width,
M routed (token, expert) pairs kept (N*k without drops).

    s = sigmoid(gate(x))                                  # [N, E] affinities, fp32
    top = topk(s + b, k)                                  # the bias b shifts the selection only
    g = route_scale * s[top] / sum(s[top])                # gate weights over the selected experts
    y = shared(x) + sum_{i in top} g_i * expert_i(x)

Notable choices:
- Experts are stacked weights (`GroupedExperts`: w1, w3 [E, C, H], w2 [E, H, C]) run as one grouped matmul
  (`torch._grouped_mm`, which also runs on CPU in fp32) over the (token, expert) pairs sorted by expert; a per-expert
  loop (`experts_loop`) is its reference. Widths whose rows are not 16-byte multiples (grouped_mm's limit) take the loop.
- Balancing (DeepSeek-V3 section 2.1.2): `expert_bias` is a persistent buffer (checkpoints carry it, resume is
  bit-exact), used for selection only. Each training forward adds its token counts to `load_stats`; after the
  optimizer step the engine sums them over the global batch and calls `apply_balance(load)`:
  b_i += rate * sign(mean(load) - load_i). Only forwards with grad count: recompute=full's no-grad forward does not,
  its replay does (once); the paper's recompute replays the sites only, not F.
- The optional sequence-wise auxiliary loss (seq_aux_loss_coef) enters as a gradient on the MoE output
  (`_AddAuxLoss`), once per micro-batch, scaled as the engine scales the LM loss (`set_aux_loss_scale`: 1 / grad_accum
  under gradient accumulation); the logged loss stays the LM loss.
- Dropless by default; capacity_factor > 0 keeps at most ceil(cf * N * k / E) tokens per expert (the earliest),
  drops the rest (counted in `load_stats`).
- The model knows nothing of parallelism: `dispatch` and `combine` move the expert-sorted rows to where the experts
  live and back; identity here, replaced from outside (`use_dispatch`, mhc_train.parallel.expert_parallel) by an
  all-to-all. The expert weights may then be shards (a DTensor: its local part is used).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mhc_train.model.layers import FeedForward

STATS = 3  # load_stats after the E counts: dropped pairs, sum of router entropy, tokens


def _local(w: torch.Tensor) -> torch.Tensor:
    """This rank's part of an expert weight (the tensor itself when whole)."""
    return w.to_local() if hasattr(w, "to_local") else w


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _AddAuxLoss(torch.autograd.Function):
    """Returns `out`; backward also sends gradient `scale` into `aux` (a loss that never joins the returned value;
    `scale` is the factor the trainer applies to the LM loss, 1 / grad_accum, so that both weigh alike)."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.aux_shape, ctx.scale = aux.shape, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, torch.full(ctx.aux_shape, ctx.scale, device=g.device, dtype=torch.float32), None


def set_aux_loss_scale(module: nn.Module, scale: float) -> None:
    """The factor on every MoE's auxiliary-loss gradient: the engine's scale of the LM loss (1 / grad_accum where
    it divides the loss per micro-batch; 1 where the schedule scales the gradients itself, as the pipeline's do)."""
    for m in module.modules():
        if isinstance(m, MoE):
            m.aux_loss_scale = scale


def grouped_ok(*widths: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `torch._grouped_mm` takes matrices of these row widths (rows of 16-byte multiples)."""
    size = torch.empty((), dtype=dtype).element_size()
    return hasattr(torch, "_grouped_mm") and all(w * size % 16 == 0 for w in widths)


def experts_grouped(x: torch.Tensor, w1, w3, w2, counts: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each row of x [M, C] by its expert, rows sorted by expert, counts [E] rows each: one grouped
    matmul per projection."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)  # [M, H]
    return _ContiguousGrad.apply(torch._grouped_mm(_ContiguousGrad.apply(h), w2, offs=offs))  # [M, C]


def experts_loop(x: torch.Tensor, w1, w3, w2, counts: torch.Tensor) -> torch.Tensor:
    """`experts_grouped`'s reference: one SwiGLU per expert over its rows."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[-1])


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: w1, w3 [E, C, H], w2 [E, H, C] (output projection)."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.grouped = True  # False: the per-expert loop (the reference)

    def expert_initial_values(self, g: torch.Generator, std: float, out_std: float) -> dict[str, torch.Tensor]:
        """w1, w3: N(0, std); w2: N(0, out_std) (the depth-scaled std of the model's output projections)."""
        return {
            "w1": torch.empty(self.w1.shape).normal_(0.0, std, generator=g),
            "w3": torch.empty(self.w3.shape).normal_(0.0, std, generator=g),
            "w2": torch.empty(self.w2.shape).normal_(0.0, out_std, generator=g),
        }

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, C] sorted by (local) expert, counts [E_local] -> [M, C] (in the autocast dtype under autocast, which
        does not cover grouped_mm itself)."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w3, w2 = (_local(w).to(x.dtype) for w in (self.w1, self.w3, self.w2))
        if self.grouped and grouped_ok(w1.shape[1], w1.shape[2], dtype=x.dtype) and x.shape[0] > 0:
            return experts_grouped(x.contiguous(), w1, w3, w2, counts)
        return experts_loop(x, w1, w3, w2, counts)


class MoE(nn.Module):
    """Routed + shared experts with auxiliary-loss-free balancing; [B, T, C] -> [B, T, C]."""

    def __init__(self, dim: int, cfg, hidden_dim: int):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.route_scale, self.rate = cfg.route_scale, cfg.bias_update_rate
        self.aux_coef, self.capacity_factor = cfg.seq_aux_loss_coef, cfg.capacity_factor
        self.gate = nn.Linear(dim, self.n_experts, bias=False)  # the router
        self.experts = GroupedExperts(self.n_experts, dim, hidden_dim)
        self.shared = FeedForward(dim, cfg.n_shared_experts * hidden_dim) if cfg.n_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(self.n_experts))  # balancing bias: state, not a parameter
        self.register_buffer("load_stats", torch.zeros(self.n_experts + STATS, dtype=torch.float64), persistent=False)
        self._dispatcher = None  # see `use_dispatch`
        self.aux_loss_scale = 1.0  # see `set_aux_loss_scale`

    # ---- placement of the routed rows (replaced by expert parallelism) --------------------------------------------
    def use_dispatch(self, dispatcher) -> None:
        """`dispatcher.dispatch(moe, x, counts) -> (x_local, counts_local, handle)` and `dispatcher.combine(moe, y,
        handle) -> y` instead of the identity (None restores it). Chosen once, when parallelism is applied."""
        self._dispatcher = dispatcher

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor):
        """Rows x [M, C] sorted by expert, counts [E] -> (the rows this rank's experts compute, their counts, handle)."""
        if self._dispatcher is None:
            return x, counts, None
        return self._dispatcher.dispatch(self, x, counts)

    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """The experts' outputs back to the rows `dispatch` was given, in its order."""
        return y if self._dispatcher is None else self._dispatcher.combine(self, y, handle)

    # ---- routing -------------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> (scores [N, E] fp32, selected experts [N, k], gate weights [N, k] fp32)."""
        scores = torch.sigmoid(self.gate(x).float())  # [N, E]
        top = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1, sorted=False).indices  # [N, k]
        w = torch.take_along_dim(scores, top, dim=-1)  # [N, k]
        return scores, top, w / w.sum(-1, keepdim=True) * self.route_scale

    def keep_mask(self, sorted_experts: torch.Tensor, counts: torch.Tensor, n_tokens: int) -> torch.Tensor | None:
        """Which of the expert-sorted pairs fit their expert's capacity (None: dropless, all)."""
        if not self.capacity_factor:
            return None
        cap = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        starts = torch.cumsum(counts, 0) - counts  # [E]
        rank_in_expert = torch.arange(sorted_experts.numel(), device=counts.device) - starts[sorted_experts]
        return rank_in_expert < cap

    def routed(self, x: torch.Tensor, top: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """sum_i g_i expert_i(x) for x [N, C]: -> ([N, C], counts per expert [E], dropped pairs)."""
        N, k = top.shape
        flat = top.flatten()  # [N*k]
        order = torch.argsort(flat, stable=True)  # pairs sorted by expert, token order within
        # [E]; a scatter-add, not bincount, whose output shape depends on the data: `mhc-train plan` traces this
        # dropless path with fake tensors, which cannot size a bincount
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        keep = self.keep_mask(flat[order], counts, N)
        dropped = 0
        if keep is not None:
            dropped = int((~keep).sum())
            kept_counts = torch.bincount(flat[order][keep], minlength=self.n_experts)
            order = order[keep]
        else:
            kept_counts = counts
        rows = x[order // k]  # [M, C]
        local, local_counts, handle = self.dispatch(rows, kept_counts)
        y = self.combine(self.experts(local, local_counts), handle)  # [M, C]
        y = y.to(x.dtype) * w.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, order // k, y), counts, dropped

    def seq_aux_loss(self, scores: torch.Tensor, top: torch.Tensor, B: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss, coef * sum_i f_i P_i averaged over the B sequences."""
        E, k = self.n_experts, self.top_k
        s = scores.view(B, -1, E)  # [B, T, E]
        T = s.shape[1]
        p = (s / s.sum(-1, keepdim=True)).mean(1)  # [B, E]
        hits = torch.zeros(B, E, device=s.device).scatter_add_(
            1, top.view(B, -1), torch.ones(B, T * k, device=s.device)
        )
        f = hits * E / (k * T)
        return self.aux_coef * (f * p).sum(-1).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        flat = x.reshape(-1, C)  # [N, C]
        scores, top, w = self.route(flat)
        out, counts, dropped = self.routed(flat, top, w)
        if self.shared is not None:
            out = out + self.shared(flat)
        if self.training and torch.is_grad_enabled():
            self.count(scores, counts, dropped)
            if self.aux_coef:
                out = _AddAuxLoss.apply(out, self.seq_aux_loss(scores, top, B), self.aux_loss_scale)
        return out.view(B, T, C)

    # ---- balancing -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def count(self, scores: torch.Tensor, counts: torch.Tensor, dropped: int) -> None:
        p = scores / scores.sum(-1, keepdim=True)
        entropy = -(p * p.clamp_min(1e-20).log()).sum()
        stats = torch.stack([entropy.double(), torch.tensor(float(scores.shape[0]), device=scores.device).double()])
        self.load_stats[: self.n_experts] += counts.double()
        self.load_stats[self.n_experts] += dropped
        self.load_stats[self.n_experts + 1 :] += stats

    @torch.no_grad()
    def apply_balance(self, stats: torch.Tensor) -> None:
        """Update the bias from `stats` (`load_stats` summed over the global batch; on the device, nothing read on
        the host) and reset the counts; `balance_metrics` reads the step's numbers."""
        load = stats[: self.n_experts]
        step = self.rate * torch.sign(load.mean() - load)
        self.expert_bias += torch.where(load.sum() > 0, step, 0.0).to(self.expert_bias.dtype)
        self.load_stats.zero_()
        self.last_stats = stats.detach().clone()

    def balance_metrics(self) -> dict:
        """The last balanced step's expert load (max and min over mean), dropped pairs, mean router entropy (nats,
        of the scores normalised over all experts) and the bias's largest magnitude."""
        stats = getattr(self, "last_stats", None)
        if stats is None:
            return {}
        load, E = stats[: self.n_experts], self.n_experts
        mean = float(load.mean()) or 1.0
        return {
            "load_max_over_mean": float(load.max()) / mean,
            "load_min_over_mean": float(load.min()) / mean,
            "dropped": float(stats[E]),
            "router_entropy": float(stats[E + 1]) / max(float(stats[E + 2]), 1.0),
            "bias_absmax": float(self.expert_bias.abs().max()),
        }


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, MoE) of every MoE FFN in `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def active_ffn_delta(cfg, dense_hidden: int) -> int:
    """Matmul weights a token uses in the FFNs of model `cfg` beyond n_layer dense SwiGLUs of width `dense_hidden`:
    each MoE layer runs the router (C x E) and k routed plus the shared experts (3 C H each) instead of 3 C F
    (FLOPs and MFU count active parameters). 0 for a dense model."""
    if cfg.ffn != "moe":
        return 0
    e, c = cfg.moe, cfg.dim
    h = e.expert_hidden_dim or dense_hidden
    per_layer = c * e.n_routed_experts + 3 * c * h * (e.top_k + e.n_shared_experts) - 3 * c * dense_hidden
    return max(cfg.n_layer - e.first_k_dense, 0) * per_layer
