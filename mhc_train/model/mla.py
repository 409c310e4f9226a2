"""Multi-head latent attention (MLA, DeepSeek-V2 section 2.1 / DeepSeek-V3): keys and values decompressed from a small
per-token latent, with a decoupled RoPE key shared by all heads.

Axis legend: B batch, T time, C channels, H heads, R kv_lora_rank, Q q_lora_rank, N qk_nope_head_dim,
P qk_rope_head_dim, V v_head_dim.

    q          = wq(x)                 or wq_b(q_norm(wq_a(x)))   (q_lora_rank > 0)      [B, T, H, N + P]
    c, k_pe    = wkv_a(x)              split R | P                                       [B, T, R], [B, T, P]
    k_nope, v  = wkv_b(kv_norm(c))     split per head N | V                              [B, T, H, N], [B, T, H, V]
    q_pe, k_pe = RoPE(q[..., N:]), RoPE(k_pe)                       (k_pe broadcast to every head)
    y          = wo(softmax((q_nope k_nope + q_pe k_pe) / sqrt(N + P)) v)

- Training runs the decompressed form through `F.scaled_dot_product_attention` (causal); the decode cache keeps the
  latent `[kv_norm(c) | RoPE(k_pe)]` (R + P numbers per token and layer) and absorbs wkv_b into the query and the
  output instead (`mhc_train/infer/mla_cache.py`).
- SDPA takes a value width V other than the query/key width N + P (CPU and CUDA's memory-efficient kernel); on CUDA
  the values are zero-padded to N + P so the flash kernel can run too (`pad_v`; the extra output columns are zero and
  sliced off, the rest is the same sum).
- RoPE is the repository's convention (`layers.apply_rope`: pairs (2i, 2i+1)), over the P rope columns, with the
  model's table (`Transformer.rope`, built for width P when model.attention=mla) and theta model.rope_theta.
- `forward(x, rope, doc)` takes the same optional document layout as the GQA attention (a packed window's
  block-diagonal mask and per-document RoPE positions), duck-typed: `doc.mask` and `doc.rotate(x, rope)`, or
  `doc.flex(q, k, v, scale)` where `doc.block_mask` is set (data.document_mask_kernel=flex).
- No YaRN scaling of the softmax (DeepSeek-V3's context extension) and no biases, as in DeepSeek-V3's pretraining.
- Parameters are `nn.Linear` and `RMSNorm` modules, so `Transformer.init_weights` initialises them as every other
  projection (N(0, init_std), `wo` depth-scaled as the GQA `attn.wo`; norm gains 1). Construction allocates only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhc_train.config import ModelConfig
from mhc_train.model.layers import RMSNorm, apply_rope


class MLAttention(nn.Module):
    """Causal multi-head latent attention; `forward(x [B, T, C], rope [>=T, P/2, 2]) -> [B, T, C]` like `Attention`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.mla
        dim, self.n_head = cfg.dim, cfg.n_head
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim**-0.5
        if self.q_lora_rank:
            self.wq_a = nn.Linear(dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_head * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, self.n_head * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)  # latent | shared RoPE key
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_head * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_head * self.v_dim, dim, bias=False)  # output projection

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C] -> q [B, T, H, N + P] (before RoPE)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        return q.view(B, T, self.n_head, self.qk_dim)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> the normalised latent c [B, T, R] and the shared RoPE key k_pe [B, T, 1, P] (before RoPE)."""
        c, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c), k_pe.unsqueeze(2)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc=None) -> torch.Tensor:
        """`doc`: a document layout (`mask` [B, 1, T, T], True = attend; `rotate(x, rope)`: RoPE at its positions)
        keeps attention and RoPE within the documents of a packed window; None: plain causal attention."""
        B, T, _ = x.shape  # batch, time, channels
        H, N, P, V = self.n_head, self.nope_dim, self.rope_dim, self.v_dim
        q_nope, q_pe = self.query(x).split([N, P], dim=-1)  # [B, T, H, N], [B, T, H, P]
        c, k_pe = self.latent(x)  # [B, T, R], [B, T, 1, P]
        if doc is None:
            q_pe, k_pe = apply_rope(q_pe, rope[:T]), apply_rope(k_pe, rope[:T])
        else:
            q_pe, k_pe = doc.rotate(q_pe, rope), doc.rotate(k_pe, rope)
        k_nope, v = self.wkv_b(c).view(B, T, H, N + V).split([N, V], dim=-1)  # [B, T, H, N], [B, T, H, V]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, T, H, N + P]
        k = torch.cat([k_nope, k_pe.expand(B, T, H, P)], dim=-1)  # [B, T, H, N + P]
        pad = pad_v(x.device, self.qk_dim, V)
        if pad:
            v = F.pad(v, (0, pad))  # [B, T, H, N + P]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, *]
        if getattr(doc, "block_mask", None) is not None:  # data.document_mask_kernel=flex (model/documents.py)
            y = doc.flex(q, k, v, scale=self.scale)  # [B, H, T, V (+ pad)]
        else:
            masking = {"is_causal": True} if doc is None else {"attn_mask": doc.mask}
            y = F.scaled_dot_product_attention(q, k, v, **masking, scale=self.scale)  # [B, H, T, V (+ pad)]
        if pad:
            y = y[..., :V]
        return self.wo(y.transpose(1, 2).reshape(B, T, H * V))


def pad_v(device: torch.device, qk_dim: int, v_dim: int) -> int:
    """Zero columns appended to the values before SDPA: on CUDA up to the query/key width when that is wider (flash
    attention wants equal widths); elsewhere none (SDPA's CPU kernels take any value width)."""
    return qk_dim - v_dim if device.type == "cuda" and qk_dim > v_dim else 0


def rope_dim(cfg: ModelConfig) -> int:
    """Width of the RoPE table the model needs: qk_rope_head_dim for MLA, the head size for GQA."""
    if cfg.attention == "mla":
        return cfg.mla.qk_rope_head_dim
    return cfg.head_dim or cfg.dim // cfg.n_head
