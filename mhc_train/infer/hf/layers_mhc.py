"""The sub-layers of an mhc-train export: RMSNorm, RoPE, GQA and multi-head latent attention, the SwiGLU FFN and the
DeepSeek-V3-style mixture-of-experts FFN (mhc_train/model/layers.py, mla.py, moe.py), for `modeling_mhc.py`.

Axis legend: B batch, T time, C channels, H heads, D head size, N tokens (B*T), E routed experts, k experts per token.

- Needs only torch and transformers (copied by `mhc-train export`; `trust_remote_code` loads it through
  `modeling_mhc.py`'s relative import).
- Attention goes through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`,
  this file's `eager_attention` for "eager") with `layer_idx` on the module; MLA runs SDPA and its transformers cache
  holds decompressed keys and values, not mhc-train's latent cache.
- MoE (`MoE`): sigmoid router scores, the top-k of scores + `expert_bias` (the balancing bias, a buffer: it selects
  only), gate weights normalised over the selected experts times `route_scale`, the routed SwiGLU experts as a plain
  per-expert loop over stacked weights (w1, w3 [E, C, H], w2 [E, H, C]), plus the shared experts. Dropless only (the
  export refuses a capacity factor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's RoPE scaling (mhc_train/model/layers.py, `llama3_inv_freq`)."""
    low, high, original = low_freq_factor, high_freq_factor, original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, scaled)


def rope_table(positions, head_dim, theta, scaling=None):
    """positions [B, T] -> [B, T, D/2, 2] cos/sin, the values of mhc-train's `rope_cache` at those positions
    (`scaling`: Llama 3's parameters, or None)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    if scaling:
        inv_freq = llama3_inv_freq(inv_freq, **scaling)
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """x [B, T, H, D], rope [B, T, D/2, 2]: rotate pairs (x[2i], x[2i+1])."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """attn_implementation="eager": softmax(q k^T * scaling + mask) v in fp32, returning the weights. query
    [B, H, T, D], key/value [B, H_kv, S, D]; the mask is boolean (True = attend) or additive, [B, 1, T, S]."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * scaling  # [B, H, T, S]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask[..., : key.shape[-2]].float()
    elif query.shape[-2] > 1:  # no mask given: causal, the new tokens at the end of the keys
        T, S = query.shape[-2], key.shape[-2]
        causal = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights  # [B, T, H, D], [B, H, T, S]


def attention_function(config):
    """The attention of `config._attn_implementation`: this file's eager one, else transformers' registry
    (sdpa, flash, flex, or one an inference engine registered)."""
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        return eager_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


class Attention(nn.Module):
    """GQA attention through transformers' attention interface: q/k/v projections (optional biases), the optional
    per-head q/k RMSNorm, RoPE on mhc-train's (2i, 2i+1) pairs, the cache update, then the configured attention
    function with `layer_idx` on the module and the caller's kwargs passed down."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = cfg, layer_idx, True
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_key_value_groups = self.n_head // self.n_kv_head
        self.scaling = self.head_dim**-0.5
        dim, bias = cfg.hidden_size, getattr(cfg, "attention_bias", False)
        self.wq = nn.Linear(dim, self.n_head * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, dim, bias=False)
        if getattr(cfg, "qk_norm", False):
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, rope, mask, cache, **kwargs):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y, weights = attention_function(self.config)(
            self, q, k, v, mask, dropout=0.0, scaling=self.scaling, **kwargs
        )  # y [B, T, H, D]
        return self.wo(y.reshape(B, T, -1)), weights


class MLAttention(nn.Module):
    """DeepSeek's multi-head latent attention (mhc_train/model/mla.py); the cache holds the decompressed keys and
    values (keys N + P wide, values V wide)."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        a, dim = cfg.mla, cfg.hidden_size
        self.layer_idx, self.n_head = layer_idx, cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = a["q_lora_rank"], a["kv_lora_rank"]
        self.nope, self.rope, self.v = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        qk = self.nope + self.rope
        if self.q_lora_rank:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_head * qk, bias=False)
        else:
            self.wq = nn.Linear(dim, self.n_head * qk, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_head * (self.nope + self.v), bias=False)
        self.wo = nn.Linear(self.n_head * self.v, dim, bias=False)

    def forward(self, x, rope, mask, cache, **kwargs):
        """(output, None): the same return as `Attention` (SDPA underneath, so no attention weights)."""
        B, T, _ = x.shape
        H, N, P, V = self.n_head, self.nope, self.rope, self.v
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q_nope, q_pe = q.view(B, T, H, N + P).split([N, P], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.kv_lora_rank, P], dim=-1)
        k_nope, v = self.wkv_b(self.kv_norm(c)).view(B, T, H, N + V).split([N, V], dim=-1)
        q_pe, k_pe = apply_rope(q_pe, rope), apply_rope(k_pe.unsqueeze(2), rope)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, N + P]
        k = torch.cat([k_nope, k_pe.expand(B, T, H, P)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, T, V]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scale = (N + P) ** -0.5
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * V)), None


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """DeepSeek-V3's MoE FFN as mhc-train trains it (mhc_train/model/moe.py, `MoE.forward` at inference):
    [B, T, C] -> [B, T, C]. `gate` the router [E, C], `experts.w1/w3/w2` the stacked routed experts, `shared` the
    always-on SwiGLU (n_shared_experts x the expert width), `expert_bias` [E] the balancing bias."""

    def __init__(self, cfg):
        super().__init__()
        m, dim = cfg.moe, cfg.hidden_size
        hidden = m.get("expert_hidden_dim") or cfg.intermediate_size
        self.n_experts, self.top_k, self.route_scale = m["n_routed_experts"], m["top_k"], m.get("route_scale", 1.0)
        self.gate = nn.Linear(dim, self.n_experts, bias=False)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.zeros(self.n_experts, dim, hidden))
        self.experts.w3 = nn.Parameter(torch.zeros(self.n_experts, dim, hidden))
        self.experts.w2 = nn.Parameter(torch.zeros(self.n_experts, hidden, dim))
        shared = m.get("n_shared_experts", 0)
        self.shared = FeedForward(dim, shared * hidden) if shared else None
        self.register_buffer("expert_bias", torch.zeros(self.n_experts))  # selection only, never a gate weight

    def forward(self, x):
        B, T, C = x.shape  # batch, time, channels
        flat = x.reshape(-1, C)  # [N, C]
        scores = torch.sigmoid(self.gate(flat).float())  # [N, E]
        top = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1, sorted=False).indices  # [N, k]
        w = torch.take_along_dim(scores, top, dim=-1)  # [N, k]
        w = w / w.sum(-1, keepdim=True) * self.route_scale
        out = torch.zeros_like(flat)
        w1, w3, w2 = (p.to(x.dtype) for p in (self.experts.w1, self.experts.w3, self.experts.w2))
        for e in range(self.n_experts):  # each expert over its tokens, in expert order (as mhc-train sums them)
            token, slot = (top == e).nonzero(as_tuple=True)
            if token.numel():
                xe = flat[token]  # [M_e, C]
                ye = (F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e]  # [M_e, C]
                out.index_add_(0, token, ye * w[token, slot, None].to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, C)
