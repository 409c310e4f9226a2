"""DeepSeek-V4's mHC arithmetic (`connection.numerics: deepseek_v4`) and its learned collapse, in this project's frame.

The spec is docs/mhc.md section 8 (the relabelling) and section 9 (the collapses): the same map as
`reference.mhc_coefficients_ref` up to relabelling, with DeepSeek's epsilons and start, as transformers ships it in
`models/deepseek_v4` (`DeepseekV4HyperConnection`, `DeepseekV4HyperHead`).

Axis legend: `...` leading token axes, n streams, C channels, K = n*n + 2n coefficient columns.

Notable choices:
- Frame: H_res here is DeepSeek's `comb` transposed (their update is `comb^T x`), so their row softmax is a
  softmax over our columns (dim -2) and their (rows, columns) rounds are our (columns, rows): the columns-first
  order `sinkhorn_forward` already uses. Logits arrive in our row-major frame (`deepseek_map.py` transposes theirs).
- The projection normalises first and multiplies after (`x * rsqrt(ms + eps) @ phi`), DeepSeek's order; the triton
  backend runs its reordered kernel (`v @ phi / sqrt(ms + eps)`, one read of v) and this file's tail: equal to fp32
  rounding.
- The backward is autograd through the unrolled iterates (2 t_max [.., n, n] tensors saved per site; no hand-written
  Function): DeepSeek's eps makes each step `m / (sum + eps)`, which the paper-numerics recomputing Function does not
  model.
"""

from __future__ import annotations

import torch

from .reference import coefficient_dtype, mhc_pre_ref

__all__ = [
    "sinkhorn_deepseek_ref",
    "mhc_projection_deepseek_ref",
    "mhc_coefficients_deepseek_ref",
    "collapse_learned_ref",
]


def sinkhorn_deepseek_ref(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """DeepSeek-V4's Sinkhorn in our frame: logits [..., n, n] (row-major, H_res left-multiplied) -> H_res.

    `m = softmax over columns (dim -2) + eps`, `m /= row sums + eps`, then `iters - 1` rounds of (columns, rows),
    every denominator `sum + eps`. `iters` counts (column, row) pairs, the softmax being the first column step, as
    `hc_sinkhorn_iters` does. eps = 0 gives the paper's `sinkhorn_knopp_ref` up to rounding.
    """
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    m = torch.softmax(logits.to(coefficient_dtype(logits.dtype)), dim=-2) + eps  # their row softmax
    m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows (their columns)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns (their rows)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows (their columns)
    return m


def mhc_projection_deepseek_ref(x: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`(vec(x) * rsqrt(mean(vec(x)^2) + eps)) @ phi`: the unweighted RMSNorm of the nC vector, then the projection
    (DeepSeek's order). x [..., n, C], phi [nC, K] -> [..., K] in the coefficient dtype."""
    ct = coefficient_dtype(x.dtype)
    v = x.flatten(-2).to(ct)  # [..., nC]
    return (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)) @ phi.to(ct)


def mhc_coefficients_deepseek_ref(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    hc_eps: float = 1e-6,
    projection=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients with DeepSeek-V4's arithmetic (docs/mhc.md section 8).

    Args:
        x [..., n, C]; phi [nC, n*n + 2n] columns [pre | post | res (row-major, our frame)]; alpha [3] (pre, post,
        res) = their `scale`; bias [n*n + 2n] = their `base` (res block transposed); eps: the RMSNorm's
        (`rms_norm_eps`); hc_eps: DeepSeek's `hc_eps`; projection: `(x, phi, eps) -> [..., K]` (default
        `mhc_projection_deepseek_ref`).
    Returns:
        h_pre = sigmoid(.) + hc_eps [..., n], h_post = 2 sigmoid(.) [..., n], h_res [..., n, n]; coefficient dtype.
    """
    n, C = x.shape[-2:]
    K = n * n + 2 * n
    if phi.shape != (n * C, K) or alpha.shape != (3,) or bias.shape != (K,):
        raise ValueError(
            f"deepseek_v4 numerics need phi [{n * C}, {K}], alpha [3], bias [{K}] for x of shape {tuple(x.shape)}; "
            f"got {tuple(phi.shape)}, {tuple(alpha.shape)}, {tuple(bias.shape)}"
        )
    h = (projection or mhc_projection_deepseek_ref)(x, phi, eps)  # [..., K]
    alpha, bias = alpha.to(h.dtype), bias.to(h.dtype)
    h_pre = torch.sigmoid(h[..., :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(h[..., n : 2 * n] * alpha[1] + bias[n : 2 * n])
    res_logits = (h[..., 2 * n :] * alpha[2] + bias[2 * n :]).unflatten(-1, (n, n))  # [..., n, n] our frame
    return h_pre, h_post, sinkhorn_deepseek_ref(res_logits, iters, hc_eps)


def collapse_learned_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, eps: float, hc_eps: float
) -> torch.Tensor:
    """DeepSeek-V4's final read (`DeepseekV4HyperHead`): `sum_j w_j x_j`, `w = sigmoid(scale * RMSNorm(vec x) @ weight
    + bias) + hc_eps`. x [..., n, C], weight [nC, n] (their `hc_fn` transposed), bias [n], scale [1] -> [..., C] in
    at least fp32 (the stream sum's accumulation dtype, as the sum collapse)."""
    ct = coefficient_dtype(x.dtype)
    h = mhc_projection_deepseek_ref(x, weight, eps)  # [..., n]
    w = torch.sigmoid(h * scale.to(ct) + bias.to(ct)) + hc_eps  # [..., n]
    return mhc_pre_ref(x.to(ct), w)
