"""The decode path of multi-head latent attention (`mhc_train/model/mla.py`): a cache of the compressed latent, and
attention computed against it with wkv_b absorbed into the query and the output (DeepSeek-V2 section 2.1.2).

Axis legend: B batch, T new tokens, L cached length, H heads, R kv_lora_rank, N qk_nope_head_dim, P qk_rope_head_dim,
V v_head_dim.

- Per layer and token the cache holds `[kv_norm(c) | RoPE(k_pe)]`: R + P numbers (576 at the paper's shapes), not
  the H (N + P + V) of decompressed keys and values (10240 for 16 heads of 128 + 64 and values of 128).
- Absorption: with wkv_b's rows split per head into W_uk [H, N, R] and W_uv [H, V, R],
  q_nope . k_nope = (W_uk^T q_nope) . c and out = W_uv (sum_j p_j c_j). So attention is multi-query attention of the
  H queries `[W_uk^T q_nope | q_pe]` (width R + P) against ONE key head, the cached `[c | k_pe]`, whose values are
  the first R columns of the keys; then W_uv per head and wo. The softmax scale stays 1 / sqrt(N + P).
- It lives in `KVCache.k` [n_layer, B, 1, max_len, R + P] (`KVCache.v` is None), so the cache's masks, positions and
  left padding work unchanged (`generate.py`). The arithmetic is the training forward's regrouped (fp32 rounding
  apart): tests/infer/test_mla_cache.py checks decode against a full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mhc_train.model.mla import MLAttention


def latent_cache(model, batch: int, max_len: int) -> torch.Tensor:
    """A zeroed latent cache [n_layer, B, 1, max_len, R + P] in the embedding's dtype and device."""
    cfg, w = model.cfg, model.tok_embeddings.weight
    width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    return torch.zeros(cfg.n_layer, batch, 1, max_len, width, dtype=w.dtype, device=w.device)


def mla_cached_attention(layer_idx, attn: MLAttention, h, cache, rope, mask, start, rope_at) -> torch.Tensor:
    """Attention of the new tokens h [B, T, C] against the layer's latent cache (written here at [start, start + T));
    `rope` [B, T, P/2, 2] at each row's positions, `mask` as `Decoder._mask`, `rope_at` the per-row RoPE."""
    B, T, _ = h.shape  # batch, new tokens, channels
    H, N, P, V, R = attn.n_head, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    end = start + T
    q_nope, q_pe = attn.query(h).split([N, P], dim=-1)  # [B, T, H, N], [B, T, H, P]
    c, k_pe = attn.latent(h)  # [B, T, R], [B, T, 1, P]
    cache.k[layer_idx, :, 0, start:end] = torch.cat([c, rope_at(k_pe, rope)[:, :, 0]], dim=-1)
    w = attn.wkv_b.weight.view(H, N + V, R)
    w_uk, w_uv = w[:, :N], w[:, N:]  # [H, N, R], [H, V, R]
    q = torch.cat([torch.einsum("bthn,hnr->bthr", q_nope, w_uk), rope_at(q_pe, rope)], dim=-1)  # [B, T, H, R + P]
    keys = cache.k[layer_idx, :, :, :end]  # [B, 1, end, R + P]
    causal = mask is None and T > 1  # a fresh, unpadded prompt: plain causal attention
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, keys[..., :R], attn_mask=mask, is_causal=causal, scale=attn.scale, enable_gqa=True
    )  # [B, H, T, R]
    out = torch.einsum("bhtr,hvr->bthv", y, w_uv)  # [B, T, H, V]
    return attn.wo(out.reshape(B, T, H * V))
