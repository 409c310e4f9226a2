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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


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


def rope_table(positions, head_dim, theta):
    """positions [B, T] -> [B, T, D/2, 2] cos/sin, the values of mhc-train's `rope_cache` at those positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x, rope):
    """x [B, T, H, D], rope [B, T, D/2, 2]: rotate pairs (x[2i], x[2i+1])."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dim = cfg.hidden_size
        self.wq = nn.Linear(dim, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, dim, bias=False)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


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

    def forward(self, x, rope, mask, cache):
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
        return self.wo(y.transpose(1, 2).reshape(B, T, H * V))


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

    def forward(self, x, sublayer):
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

    def forward(self, x, sublayer):
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

    def forward(self, x, rope, mask, cache):
        x = self.attn_conn(x, lambda h: self.attn(self.attn_norm(h), rope, mask, cache))  # [B, T, n, C]
        return self.ffn_conn(x, lambda h: self.ffn(self.ffn_norm(h)))  # [B, T, n, C]


class MHCModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_streams = 1 if cfg.connection.get("type") == "residual" else cfg.connection.get("n_streams", 4)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, positions, mask, cache):
        h = self.tok_embeddings(input_ids)  # [B, T, C]
        x = h.unsqueeze(-2).expand(*h.shape[:-1], self.n_streams, h.shape[-1]).contiguous()  # [B, T, n, C]
        mla = getattr(self.cfg, "attention", "gqa") == "mla"
        rope = rope_table(
            positions, self.cfg.mla["qk_rope_head_dim"] if mla else self.cfg.head_dim, self.cfg.rope_theta
        )
        for layer in self.layers.values():
            x = layer(x, rope, mask, cache)
        return self.output(self.norm(x.sum(dim=-2)))  # [B, T, V]


class MHCForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MHCConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = MHCModel(config)
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the exported checkpoint

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        labels=None,
        return_dict=None,
        **kwargs,
    ):
        B, T = input_ids.shape
        past_key_values = kwargs.pop("cache", None) or past_key_values  # transformers 5 names it `cache`
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row counts from its first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            end = attention_mask.shape[1]
            q = torch.arange(end - T, end, device=input_ids.device)[:, None]
            k = torch.arange(end, device=input_ids.device)[None, :]
            mask = ((k <= q) & (attention_mask.bool()[:, None, :] | (k == q)))[:, None]  # pad queries see themselves
        elif past and T > 1:
            q = torch.arange(past, past + T, device=input_ids.device)[:, None]
            mask = (torch.arange(past + T, device=input_ids.device)[None, :] <= q)[None, None]
        cache = past_key_values
        if cache is None and use_cache:  # generate() passes its own cache; a plain call caches only when asked
            from transformers import DynamicCache

            cache = DynamicCache(config=self.config)
        logits = self.model(input_ids, position_ids, mask, cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"  # 5 / 4
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{field: cache})
