"""LLaMA-style building blocks: RMSNorm, RoPE, causal attention (SDPA, optional GQA), SwiGLU FFN.

Optional, for Hugging Face checkpoints (off by default): q/k/v biases (Qwen2), a per-head q/k RMSNorm before RoPE
(Qwen3), Llama 3's RoPE frequency scaling (`scaled_rope_cache`). RoPE rotates the pairs (x[2i], x[2i+1]);
`mhc_train.infer.import_hf` permutes Hugging Face's rotate-half q/k rows into this layout.

Axis legend: B batch, T time, C channels, H heads, D head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos/sin table of shape [max_seq_len, head_dim // 2, 2] (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths shorter than original/high kept, longer than original/low divided by
    `factor`, a linear blend in between (in the smoothing variable original / wavelength)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)  # 0: fully scaled, 1: kept
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(
        wavelen < original / high, inv_freq, torch.where(wavelen > original / low, inv_freq / factor, blended)
    )


def scaled_rope_cache(
    head_dim: int, max_seq_len: int, theta: float, scaling: tuple | None, device=None
) -> torch.Tensor:
    """`rope_cache`, its frequencies scaled by `llama3_inv_freq(inv_freq, *scaling)` (None: `rope_cache` itself)."""
    if scaling is None:
        return rope_cache(head_dim, max_seq_len, theta, device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    inv_freq = llama3_inv_freq(inv_freq, *scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the position angle. x [B, T, H, D], rope [T, D/2, 2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]  # [T, 1, D/2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, head_dim: int, qkv_bias: bool = False,
                 qk_norm: bool = False, norm_eps: float = 1e-6):  # fmt: skip
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.wq = nn.Linear(dim, n_head * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, n_kv_head * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, n_kv_head * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)  # output projection
        if qk_norm:  # Qwen3: RMSNorm over each head of q and k, before RoPE
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc=None) -> torch.Tensor:
        """`doc`: a `DocumentLayout` (model/documents.py) keeps attention and RoPE within documents; None: causal."""
        B, T, _ = x.shape  # batch, time, channels
        q = self.wq(x).view(B, T, -1, self.head_dim)  # -1: local heads under tensor parallelism
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if hasattr(self, "q_norm"):  # model.qk_norm
            q, k = self.q_norm(q), self.k_norm(k)
        if doc is None:
            q, k = apply_rope(q, rope[:T]), apply_rope(k, rope[:T])
        else:
            q, k = doc.rotate(q, rope), doc.rotate(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if getattr(doc, "block_mask", None) is not None:  # data.document_mask_kernel=flex (model/documents.py)
            y = doc.flex(q, k, v, enable_gqa=self.n_kv_head != self.n_head)
        elif doc is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        else:  # a boolean mask: CUDA's memory-efficient kernel takes it, but not with enable_gqa (SDPA would fall
            # back to the math kernel and hold [B, H, T, T]), so the kv heads are repeated to the query heads here
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc.mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
