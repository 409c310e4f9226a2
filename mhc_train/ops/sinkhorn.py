"""Sinkhorn-Knopp with a hand-written backward that recomputes the iterates (the paper's kernel strategy, in torch).

Forward stores only the logits; backward re-runs the t_max (column, row) steps, keeps the iterates for the duration
of the backward, and walks them in reverse. Both directions work token-last (`[n, n, tokens]`), so every reduction
over a matrix axis is a handful of contiguous vector adds instead of a strided reduction per token.

Backward of one normalisation `y = x / s`, `s = sum_a x` (a = the row or column axis):
    dx = (dy - sum_a(dy * y)) / s
and of `M0 = exp(z - max z)`: dz = dM0 * M0 (the shift is exact, so it carries no gradient).
"""

from __future__ import annotations

import torch

from mhc_train.ops.reference import coefficient_dtype, sinkhorn_forward


def _forward(z: torch.Tensor, iters: int, keep: bool):
    """z [n, n, T] (token-last). Returns the result and, if keep, M_0 then every (y, s) pair in order."""
    saved = [] if keep else None
    return sinkhorn_forward(z, iters, dims=(0, 1), saved=saved), saved


class SinkhornFunction(torch.autograd.Function):
    """Saves the logits only (n*n per token); recomputes 2 * iters iterates in backward (transient memory)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int):
        lead = logits.shape[:-2]
        n = logits.shape[-1]
        z = logits.to(coefficient_dtype(logits.dtype)).reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n, n, T]
        out, _ = _forward(z, iters, keep=False)
        ctx.save_for_backward(z)
        ctx.iters, ctx.lead, ctx.in_dtype = iters, lead, logits.dtype
        return out.permute(2, 0, 1).contiguous().reshape(*lead, n, n)  # token-first, contiguous for matmul

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        (z,) = ctx.saved_tensors
        n = z.shape[0]
        _, saved = _forward(z, ctx.iters, keep=True)
        g = grad_out.to(z.dtype).reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n, n, T]
        for step in range(len(saved) - 1, 0, -1):
            y, s = saved[step]
            axis = 0 if step % 2 == 1 else 1  # odd steps normalised columns (sum over rows, axis 0)
            g = (g - (g * y).sum(dim=axis, keepdim=True)) / s
        g = g * saved[0]
        grad = g.permute(2, 0, 1).contiguous().reshape(*ctx.lead, n, n).to(ctx.in_dtype)
        return grad, None


def sinkhorn_knopp_torch(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Same contract as `sinkhorn_knopp_ref`: [..., n, n] logits -> [..., n, n] (coefficient dtype)."""
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1, got {iters}")
    return SinkhornFunction.apply(logits, iters)


class SinkhornImplicitFunction(torch.autograd.Function):
    """Sinkhorn forward (unrolled, no graph), backward by implicit differentiation of the fixed point.

    At a fixed point P = diag(u) exp(z) diag(v) with rows and columns summing to r = P 1 and c = P^T 1, the gradient
    of a loss with dL/dP = G is dL/dz = P * (G - a 1^T - 1 b^T), where (a, b) solve
        [diag(r)  P      ] [a]   [(P * G) 1  ]
        [P^T      diag(c)] [b] = [(P * G)^T 1]
    (one redundant equation: b_n = 0 is pinned, leaving a (2n-1) x (2n-1) system per token). Saves P only; no
    iterate is recomputed. Exact at convergence; with t_max iterations that have not converged (peaked logits) it
    differs from the unrolled gradient, which is the gradient of what the forward actually computed.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int):
        with torch.no_grad():
            p = sinkhorn_knopp_torch(logits, iters)
        ctx.save_for_backward(p)
        ctx.in_dtype = logits.dtype
        return p

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (p,) = ctx.saved_tensors
        n = p.shape[-1]
        g = grad_out.to(p.dtype)
        pg = p * g
        r, c = p.sum(-1), p.sum(-2)  # [..., n]
        top = torch.cat([torch.diag_embed(r), p[..., :, : n - 1]], dim=-1)  # b_n pinned to 0
        bottom = torch.cat([p.transpose(-1, -2)[..., : n - 1, :], torch.diag_embed(c[..., : n - 1])], dim=-1)
        system = torch.cat([top, bottom], dim=-2)  # [..., 2n-1, 2n-1]
        rhs = torch.cat([pg.sum(-1), pg.sum(-2)[..., : n - 1]], dim=-1)
        sol = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1)
        a = sol[..., :n]
        b = torch.cat([sol[..., n:], torch.zeros_like(sol[..., :1])], dim=-1)
        return (p * (g - a.unsqueeze(-1) - b.unsqueeze(-2))).to(ctx.in_dtype), None


def sinkhorn_knopp_implicit(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Same forward as `sinkhorn_knopp_torch`; backward by the implicit function theorem (see the Function)."""
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    return SinkhornImplicitFunction.apply(logits, iters)
