"""Pure-PyTorch reference of the connection math (mHC paper, arXiv 2512.24880, Eqs. 7-9, 14-16).

This file is the spec the Triton kernels are tested against: short, vectorised over tokens, autograd-correct.

Axis legend: `...` any leading token axes (batch, time), `n` streams, `c` channels (C), `k` coefficient columns.

Notable choices:
- H_res is **left-multiplied**: new stream i = sum_j H_res[i, j] * x_j (einsum `...ij,...jc->...ic`).
- The coefficient path (projection, gates, sigmoid, Sinkhorn) runs in at least float32 whatever the stream dtype;
  float64 inputs stay float64 (for gradcheck). Stream outputs are cast back to the stream dtype once.
- Sinkhorn normalises columns first and rows last, so rows sum to 1 exactly after the final step and all truncation
  error sits in the column sums.
- `h_res=None` means a fixed identity H_res (the "identity H_res" ablation arm).
"""

from __future__ import annotations

import torch

__all__ = [
    "sinkhorn_knopp_ref",
    "sinkhorn_forward",
    "mhc_coefficients_ref",
    "mhc_pre_ref",
    "mhc_post_res_ref",
    "hc_projection_ref",
    "hc_gates_ref",
    "coefficient_dtype",
]


def coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the coefficient path: float32, or float64 when the input already is."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_knopp_ref(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Sinkhorn-Knopp projection onto (approximately) doubly stochastic matrices, Eq. 9.

    Args:
        logits: [..., n, n] unnormalised log-weights.
        iters: number of (column, row) normalisation pairs, `t_max` in the paper.
    Returns:
        [..., n, n] in the coefficient dtype; every row sums to 1 (to float precision), columns approximately.
    """
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1, got {iters}")
    return sinkhorn_forward(logits.to(coefficient_dtype(logits.dtype)), iters)


def sinkhorn_forward(z, iters: int, dims: tuple[int, int] = (-2, -1), saved: list | None = None, inplace=False):
    """The torch backend's one Sinkhorn forward (Eq. 9): `exp(z - max)`, then `iters` (column, row) normalisations.

    Args:
        z: logits whose matrix axes (i, j) are `dims`: (-2, -1) token-first (the reference), (0, 1) token-last
            (`ops/sinkhorn.py`, whose backward recomputes the iterates). Columns (sums over i) first, rows last.
        saved: a list that receives M_0, then every (iterate, sums) pair in order (the recomputing backward).
        inplace: divide in place (decode's fallback, no autograd: no tensor allocated per step but the sums).
    """
    # The shift is exact: Sinkhorn ignores row and column scalings, and exp never overflows after it.
    m = torch.exp(z - z.amax(dim=dims, keepdim=True).detach())
    if saved is not None:
        saved.append(m)
    for _ in range(iters):
        for axis in dims:  # columns first (each column summed over i), rows last
            s = m.sum(dim=axis, keepdim=True)
            m = m.div_(s) if inplace else m / s
            if saved is not None:
                saved.append((m, s))
    return m


def mhc_projection_ref(x: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`RMSNorm(vec(x)) @ phi` with the reordered norm (Eqs. 14-16): matmul first, divide by r after.

    Args:
        x: [..., n, C] streams. phi: [n*C, K] with the RMSNorm gain folded in.
    Returns:
        [..., K] in the coefficient dtype.
    """
    ct = coefficient_dtype(x.dtype)
    v = x.flatten(-2).to(ct)  # [..., nC]
    proj = v @ phi.to(ct)  # [..., K]
    ms = torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1]  # mean square, one pass
    return proj / torch.sqrt(ms + eps)


def hc_projection_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HC's dynamic projection: every stream RMS-normalised on its own, then `@ weight`.

    Args:
        x: [..., n, C] streams. weight: [C, K_s] with the RMSNorm gain folded in (gain[:, None] * W).
    Returns:
        [..., n, K_s] in the coefficient dtype.
    """
    ct = coefficient_dtype(x.dtype)
    xf = x.to(ct)
    return (xf @ weight.to(ct)) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)


def hc_gates_ref(h: torch.Tensor, static: torch.Tensor, scale: torch.Tensor):
    """HC's dynamic coefficients from the per-stream projection: `block = tanh(h) * scale + static`, row j of the
    [n, n+2] block being (A_m[j], B[j], A_r[j, :]).

    Args:
        h: [..., n, n+2] (`hc_projection_ref`'s output). static: [n, n+2]. scale: [n+2] ([s_alpha, s_beta, s_alpha..]).
    Returns:
        h_pre = A_m [..., n], h_post = B [..., n], h_res = A_r^T [..., n, n] (this file's left-multiplied convention).
    """
    block = torch.tanh(h) * scale + static
    return block[..., 0], block[..., 1], block[..., 2:].transpose(-1, -2)


def mhc_coefficients_ref(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    sinkhorn=None,
    projection=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """mHC coefficients for one site (Eqs. 7-8).

    Args:
        x: [..., n, C] stream state (any float dtype).
        phi: [n*C, n*n + 2n], columns ordered [pre | post | res]; or [n*C, 2n] for the identity-H_res arm.
        alpha: [3] gates (pre, post, res); [2] for the identity-H_res arm.
        bias: [n*n + 2n] (or [2n]) ordered like phi's columns.
        sinkhorn: the Sinkhorn implementation (default `sinkhorn_knopp_ref`).
        projection: the `(x, phi, eps) -> [..., K]` implementation (default `mhc_projection_ref`).
    Returns:
        h_pre [..., n], h_post [..., n], h_res [..., n, n] (None for the identity-H_res arm); coefficient dtype.
    """
    n, C = x.shape[-2:]
    full, reduced = n * n + 2 * n, 2 * n
    if phi.shape not in ((n * C, full), (n * C, reduced)):
        raise ValueError(
            f"phi must be [n*C, n*n+2n] = [{n * C}, {full}] (or [{n * C}, {reduced}] without H_res) "
            f"for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}"
        )
    k = phi.shape[1]
    if bias.shape != (k,) or alpha.shape != ((3,) if k == full else (2,)):
        raise ValueError(
            f"bias must be [{k}] and alpha [{3 if k == full else 2}], got {tuple(bias.shape)}, {tuple(alpha.shape)}"
        )
    h = (projection or mhc_projection_ref)(x, phi, eps)  # [..., K]
    ct = h.dtype
    alpha, bias = alpha.to(ct), bias.to(ct)
    h_pre = torch.sigmoid(alpha[0] * h[..., :n] + bias[:n])
    h_post = 2.0 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + bias[n : 2 * n])
    if k == reduced:
        return h_pre, h_post, None
    res_logits = (alpha[2] * h[..., 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n))  # row-major n x n
    return h_pre, h_post, (sinkhorn or sinkhorn_knopp_ref)(res_logits, iters)


def mhc_pre_ref(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """Read one C-vector from the streams: `sum_j h_pre[j] x_j`. x [..., n, C], h_pre [..., n] -> [..., C]."""
    ct = coefficient_dtype(x.dtype)
    return (h_pre.to(ct).unsqueeze(-2) @ x.to(ct)).squeeze(-2).to(x.dtype)  # [..., 1, n] @ [..., n, C]


def mhc_post_res_ref(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None
) -> torch.Tensor:
    """Next stream state `H_res x + H_post^T y` (Eq. 3).

    x [..., n, C], y [..., C] (the sub-layer output), h_post [..., n], h_res [..., n, n] or None (identity)
    -> [..., n, C] in x's dtype.
    """
    ct = coefficient_dtype(x.dtype)
    xc, yc = x.to(ct), y.to(ct)
    mixed = xc if h_res is None else h_res.to(ct) @ xc  # [..., n, n] @ [..., n, C]: sum_j H_res[i, j] x_j
    return (mixed + h_post.to(ct).unsqueeze(-1) * yc.unsqueeze(-2)).to(x.dtype)
