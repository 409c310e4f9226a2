"""mhc-train models for Hugging Face `transformers`: the residual, HC and mHC arms in one self-contained file.

Copied by `mhc-train export` next to `config.json` and `model.safetensors`; loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Needs only torch and transformers (it imports
nothing of mhc_train). The connection math is mhc-train's torch path (`mhc_train/model/connections.py`,
`mhc_train/ops/reference.py`), line for line; `tests/infer/test_infer.py` checks the logits match (fp32, 1e-5).

Axis legend: B batch, T time, n streams, C channels, H heads, D head size.

- Streams: the token embedding is replicated n times, every sub-layer is wrapped by its connection site,
  `x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)` with H_res left-multiplied (new stream i = sum_j H_res[i, j] x_j), and
  the streams are summed before the final RMSNorm.
- mHC: coefficients from the RMS-normalised nC vector (reordered norm), gates alpha (pre, post, res), biases, sigmoid,
  2 sigmoid and Sinkhorn-Knopp (columns first, rows last, t_max iterations). HC: static B, A_m, A_r plus the dynamic
  tanh terms from each stream normalised on its own; h_res = A_r^T.
- Generation uses the transformers KV cache (`past_key_values`) for attention; the connection coefficients and stream
  state are per-token, so each step computes them for the new tokens only.
- Attention is mhc-train's GQA, or its multi-head latent attention where config.json says `attention: mla`
  (`MLAttention`; the transformers cache then holds decompressed keys and values, not mhc-train's latent cache).
- Parameter names are mhc-train's under `model.` (a tied LM head is exported untied, as a copy).
- Serving engines (vLLM's and SGLang's Transformers backends): `MHCModel` (AutoModel) is the decoder, `MHCForCausalLM`
  adds `lm_head`; every layer's attention is `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` (this file's
  `eager_attention` for "eager") with `layer_idx` on the module and the caller's kwargs passed down, and
  `_supports_attention_backend = True`. Masks: our own boolean one for eager, sdpa and registered functions,
  transformers' `create_causal_mask` for flash and flex. `output_hidden_states` gives the streams' sum after each
  block (the last one normed); `output_attentions` the eager weights.
- Under `no_grad` in fp32 the HC and mHC sites run mhc-train generate's regrouped decode math (`decode_coefficients`,
  `decode_site`; Sinkhorn as torch ops in place); with autograd, the plain math above. Both are tested equal.
- Parameter names are mhc-train's under `model.`, the head `lm_head` (a tied head is exported untied, as a copy).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel


class MHCConfig(PretrainedConfig):
    model_type = "mhc_train"

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_size=704,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        connection=None,
        attention="gqa",
        mla=None,
        attention_bias=False,
        qk_norm=False,
        mhc_rope_scaling=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        # mhc-train's ConnectionConfig as a dict: type (residual | hc | mhc), n_streams, hc_dynamic, h_res, t_max, eps
        self.connection = dict(connection or {"type": "residual", "n_streams": 1})
        # mhc-train's model.attention and, for "mla", its MLAConfig as a dict: q_lora_rank (0 = none), kv_lora_rank,
        # qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.attention = attention
        self.mla = dict(mla or {})
        self.attention_bias = attention_bias  # biases on q, k, v (model.qkv_bias)
        self.qk_norm = qk_norm  # per-head RMSNorm of q and k before RoPE (model.qk_norm)
        self.mhc_rope_scaling = mhc_rope_scaling  # Llama 3's RoPE scaling parameters, or None (model.rope_scaling)
        kwargs["tie_word_embeddings"] = False  # the head is exported as its own tensor
        super().__init__(**kwargs)


# ---- layers (mhc_train/model/layers.py) --------------------------------------------------------------------------
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


# ---- connection math (mhc_train/ops/reference.py, torch path) ----------------------------------------------------
def sinkhorn_knopp(logits, iters):
    z = logits.float()
    m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # columns first
        m = m / m.sum(dim=-1, keepdim=True)  # rows last
    return m


def mhc_coefficients(x, phi, alpha, bias, iters, eps):
    n = x.shape[-2]
    v = x.flatten(-2).float()  # [..., nC]
    proj = v @ phi.float()
    ms = torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1]
    h = proj / torch.sqrt(ms + eps)  # reordered RMSNorm (Eqs. 14-16)
    alpha, bias = alpha.float(), bias.float()
    h_pre = torch.sigmoid(alpha[0] * h[..., :n] + bias[:n])
    h_post = 2.0 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + bias[n : 2 * n])
    if phi.shape[1] == 2 * n:  # identity H_res
        return h_pre, h_post, None
    res_logits = (alpha[2] * h[..., 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n))  # row-major n x n
    return h_pre, h_post, sinkhorn_knopp(res_logits, iters)


def mhc_pre(x, h_pre):
    return (h_pre.float().unsqueeze(-2) @ x.float()).squeeze(-2).to(x.dtype)  # [..., C]


def mhc_post_res(x, y, h_post, h_res):
    xc, yc = x.float(), y.float()
    mixed = xc if h_res is None else h_res.float() @ xc  # sum_j H_res[i, j] x_j
    return (mixed + h_post.float().unsqueeze(-1) * yc.unsqueeze(-2)).to(x.dtype)


# ---- decode: the same math regrouped into a few ops per site (mhc_train/infer/sites.py, without its C Sinkhorn) ----
def decoding(x):
    """Inference in fp32 (no autograd): the sites take their regrouped path; training keeps the plain math above."""
    return not torch.is_grad_enabled() and x.dtype == torch.float32


def decode_site(x, sublayer, h_pre, h_post, h_res):
    """`H_res x + H_post^T F(H_pre x)` over N = B*T tokens: the read as one bmm, the write as one multiply and one
    in-place baddbmm. h_pre, h_post [N, n], h_res [N, n, n] or None (identity)."""
    B, T, n, C = x.shape
    xs = x.reshape(B * T, n, C)  # [N, n, C]
    y = sublayer(torch.bmm(h_pre.unsqueeze(1), xs).view(B, T, C))  # F(H_pre x): [B, T, C]
    out = h_post.unsqueeze(-1) * y.reshape(B * T, 1, C)  # H_post^T y: [N, n, C]
    out = out.add_(xs) if h_res is None else out.baddbmm_(h_res, xs)
    return out.view(B, T, n, C)


def versions(*params):
    return tuple((p._version, p.device) for p in params)


class ResidualSite(nn.Module):
    def forward(self, x, sublayer):
        return x + sublayer(x.squeeze(-2)).unsqueeze(-2)


class HCSite(nn.Module):
    def __init__(self, dim, n, conn):
        super().__init__()
        self.n, self.dynamic, self.eps = n, conn.get("hc_dynamic", True), conn.get("eps", 1e-6)
        self.static_beta = nn.Parameter(torch.ones(n))
        self.static_alpha_m = nn.Parameter(torch.zeros(n))
        self.static_alpha_r = nn.Parameter(torch.eye(n))
        if self.dynamic:
            self.norm_weight = nn.Parameter(torch.ones(dim))
            self.dyn_proj = nn.Parameter(torch.zeros(dim, n + 2))  # [W_m | W_b | W_r (n)]
            self.dyn_scale = nn.Parameter(torch.zeros(2))  # (s_alpha, s_beta)

    def coefficients(self, x):
        n, lead = self.n, x.shape[:-2]
        a_m = self.static_alpha_m.float().expand(*lead, n)
        beta = self.static_beta.float().expand(*lead, n)
        a_r = self.static_alpha_r.float().expand(*lead, n, n)
        if self.dynamic:
            xf = x.float()
            xn = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
            d = torch.tanh(xn @ self.dyn_proj.float())  # [B, T, n, n+2]
            s_alpha, s_beta = self.dyn_scale.float().unbind()
            a_m = a_m + s_alpha * d[..., 0]
            beta = beta + s_beta * d[..., 1]
            a_r = a_r + s_alpha * d[..., 2:]
        return a_m, beta, a_r.transpose(-1, -2)

    def decode_coefficients(self, x):
        """HC's coefficients for decode: row j of [N, n, n+2] is (A_m[j], B[j], A_r[j, :]) = static + scale * tanh."""
        params = [self.static_alpha_m, self.static_beta, self.static_alpha_r]
        if self.dynamic:
            params += [self.norm_weight, self.dyn_proj, self.dyn_scale]
        if getattr(self, "_decode_key", None) != versions(*params):  # built once per weights
            static = torch.cat([self.static_alpha_m[:, None], self.static_beta[:, None], self.static_alpha_r], 1)
            self._static = static.float()  # [n, n+2]
            if self.dynamic:
                self._proj = self.norm_weight.float()[:, None] * self.dyn_proj.float()  # the norm's gain folded in
                s_alpha, s_beta = self.dyn_scale.float().unbind()
                self._scale = torch.cat([s_alpha[None], s_beta[None], s_alpha.expand(self.n)])  # [n+2]
            self._decode_key = versions(*params)
        N = x.shape[0] * x.shape[1]
        if self.dynamic:
            xs = x.reshape(N, *x.shape[-2:])  # [N, n, C]
            d = torch.tanh((xs @ self._proj) * torch.rsqrt(xs.square().mean(-1, keepdim=True) + self.eps))
            block = d.mul_(self._scale).add_(self._static)  # [N, n, n+2]
        else:
            block = self._static.expand(N, -1, -1)
        return block[..., 0], block[..., 1], block[..., 2:].transpose(-1, -2)

    def forward(self, x, sublayer):
        if decoding(x):
            return decode_site(x, sublayer, *self.decode_coefficients(x))
        h_pre, h_post, h_res = self.coefficients(x)
        return mhc_post_res(x, sublayer(mhc_pre(x, h_pre)), h_post, h_res)


class MHCSite(nn.Module):
    def __init__(self, dim, n, conn):
        super().__init__()
        self.n, self.iters, self.eps = n, conn.get("t_max", 20), conn.get("eps", 1e-6)
        k = 2 * n if conn.get("h_res", "sinkhorn") == "identity" else n * n + 2 * n
        self.phi = nn.Parameter(torch.zeros(n * dim, k))
        self.alpha = nn.Parameter(torch.zeros(2 if k == 2 * n else 3))
        self.bias = nn.Parameter(torch.zeros(k))

    def decode_coefficients(self, x):
        """mHC's coefficients for decode: one projection, the reordered RMSNorm in place, one multiply-add by the
        per-column gates and biases, one sigmoid scaled (1 | 2) for H_pre and H_post, Sinkhorn in place."""
        n = self.n
        if getattr(self, "_decode_key", None) != versions(self.phi, self.alpha, self.bias):  # built once per weights
            blocks = torch.tensor([n, n] if self.alpha.numel() == 2 else [n, n, n * n], device=self.phi.device)
            self._gate = self.alpha.float().repeat_interleave(blocks)  # [K]: alpha (pre, post, res) per column
            self._scale = torch.ones(2 * n, device=self.phi.device)
            self._scale[n:] = 2.0  # H_pre = sigmoid, H_post = 2 sigmoid
            self._decode_key = versions(self.phi, self.alpha, self.bias)
        v = x.reshape(-1, n * x.shape[-1])  # [N, nC]
        h = torch.mm(v, self.phi.float())  # [N, K], then the reordered RMSNorm in place
        h.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[1]).add_(self.eps).sqrt_())
        logits = h.mul_(self._gate).add_(self.bias.float())  # [N, K]
        gates = torch.sigmoid(logits[:, : 2 * n]).mul_(self._scale)  # [N, 2n]: H_pre | H_post
        if self.alpha.numel() == 2:
            return gates[:, :n], gates[:, n:], None
        z = logits[:, 2 * n :].reshape(-1, n, n)  # [N, n, n], row-major
        m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
        for _ in range(self.iters):
            m.div_(m.sum(dim=-2, keepdim=True))  # columns first
            m.div_(m.sum(dim=-1, keepdim=True))  # rows last
        return gates[:, :n], gates[:, n:], m

    def forward(self, x, sublayer):
        if decoding(x):
            return decode_site(x, sublayer, *self.decode_coefficients(x))
        h_pre, h_post, h_res = mhc_coefficients(x, self.phi, self.alpha, self.bias, self.iters, self.eps)
        return mhc_post_res(x, sublayer(mhc_pre(x, h_pre)), h_post, h_res)


def make_site(cfg):
    conn = cfg.connection
    kind, n = conn.get("type", "residual"), conn.get("n_streams", 1)
    if kind == "residual":
        return ResidualSite()
    return (HCSite if kind == "hc" else MHCSite)(cfg.hidden_size, n, conn)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = (
            MLAttention(cfg, layer_idx) if getattr(cfg, "attention", "gqa") == "mla" else Attention(cfg, layer_idx)
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.attn_conn = make_site(cfg)
        self.ffn_conn = make_site(cfg)

    def forward(self, x, rope, mask, cache, **kwargs):
        """x [B, T, n, C] -> (x [B, T, n, C], attention weights or None)."""
        out = {}

        def attend(h):
            y, out["weights"] = self.attn(self.attn_norm(h), rope, mask, cache, **kwargs)
            return y

        x = self.attn_conn(x, attend)  # [B, T, n, C]
        x = self.ffn_conn(x, lambda h: self.ffn(self.ffn_norm(h)))  # [B, T, n, C]
        return x, out.get("weights")


def causal_mask(config, embeds, attention_mask, cache, position_ids, past):
    """The mask the configured attention expects: transformers' own builder for the implementations it knows beyond
    eager and sdpa (flash, flex); for eager, sdpa and any other registered function a boolean [B, 1, T, S] (True =
    attend; a pad query sees itself, so no softmax row is empty), or None where plain causal attention is exact."""
    B, T = embeds.shape[:2]
    impl, device = getattr(config, "_attn_implementation", None) or "sdpa", embeds.device
    if impl not in ("eager", "sdpa"):
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
        except ImportError:
            ALL_MASK_ATTENTION_FUNCTIONS = {}
        if impl in ALL_MASK_ATTENTION_FUNCTIONS:
            params = inspect.signature(create_causal_mask).parameters
            kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
            kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
            kw["cache" if "cache" in params else "past_key_values"] = cache
            if "cache_position" in params:
                kw["cache_position"] = torch.arange(past, past + T, device=device)
            return create_causal_mask(**kw)
    if attention_mask is not None and not bool(attention_mask.all()):
        end = attention_mask.shape[1]
        q = torch.arange(end - T, end, device=device)[:, None]
        k = torch.arange(end, device=device)[None, :]
        return ((k <= q) & (attention_mask.bool()[:, None, :] | (k == q)))[:, None]  # pad queries see themselves
    if past and T > 1:
        q = torch.arange(past, past + T, device=device)[:, None]
        return (torch.arange(past + T, device=device)[None, :] <= q)[None, None].expand(B, 1, T, past + T)
    return None


def output_class(name):
    """transformers 5 names the cache field `cache`, 4 `past_key_values`."""
    from transformers import modeling_outputs

    cls = getattr(modeling_outputs, name)
    return cls, ("cache" if "cache" in cls.__dataclass_fields__ else "past_key_values")


class MHCPreTrainedModel(PreTrainedModel):
    config_class = MHCConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # every layer's attention goes through ALL_ATTENTION_FUNCTIONS

    def _init_weights(self, module):
        pass  # every weight comes from the exported checkpoint


class MHCModel(MHCPreTrainedModel):
    """The decoder without the LM head (AutoModel): last_hidden_state is the final RMSNorm of the streams' sum."""

    def __init__(self, config):
        super().__init__(config)
        self.n_streams = 1 if config.connection.get("type") == "residual" else config.connection.get("n_streams", 4)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):  # fmt: skip
        cfg = self.config
        cache = kwargs.pop("cache", None) or past_key_values  # transformers 5 names it `cache`
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else getattr(cfg, "use_return_dict", True)
        for key in ("cache_position", "labels", "logits_to_keep"):
            kwargs.pop(key, None)
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        B, T = h.shape[:2]
        if cache is None and use_cache:  # generate() passes its own cache; a plain call caches only when asked
            from transformers import DynamicCache

            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row counts from its first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device).expand(B, T)
        mask = causal_mask(cfg, h, attention_mask, cache, position_ids, past)
        x = h.unsqueeze(-2).expand(B, T, self.n_streams, h.shape[-1]).contiguous()  # [B, T, n, C]
        width = cfg.mla["qk_rope_head_dim"] if getattr(cfg, "attention", "gqa") == "mla" else cfg.head_dim
        rope = rope_table(position_ids, width, cfg.rope_theta, getattr(cfg, "mhc_rope_scaling", None))
        hidden, attentions = [], []
        for layer in self.layers.values():
            if output_hidden_states:
                hidden.append(x.sum(dim=-2))  # the streams' sum, [B, T, C]
            x, weights = layer(x, rope, mask, cache, **kwargs)
            attentions.append(weights)
        out = self.norm(x.sum(dim=-2))  # [B, T, C]
        hidden = (*hidden, out) if output_hidden_states else None
        attentions = tuple(attentions) if output_attentions else None
        cls, field = output_class("BaseModelOutputWithPast")
        result = cls(last_hidden_state=out, hidden_states=hidden, attentions=attentions, **{field: cache})
        return result if return_dict else result.to_tuple()


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MHCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, labels=None, return_dict=None, logits_to_keep=0,
                **kwargs):  # fmt: skip
        return_dict = return_dict if return_dict is not None else getattr(self.config, "use_return_dict", True)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         return_dict=True, **kwargs)  # fmt: skip
        cls, field = output_class("CausalLMOutputWithPast")
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        result = cls(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                     **{field: getattr(out, field)})  # fmt: skip
        return result if return_dict else result.to_tuple()
