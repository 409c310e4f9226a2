"""Sinkhorn-Knopp, all iterations fused in one kernel (mHC paper kernel 3, Eq. 9), forward and backward, fp32.

Forward: per token, exp(z - max z) then `iters` (column, row) normalisations in registers; one read of n*n logits,
one write of n*n. Backward: exact through all iterations, O(iters) per token with the iterates on chip: a forward
sweep recomputes the iterations from the logits and keeps each step's sums (n values per step) in registers; the
reverse sweep recovers each step's input from its output (m = y * s) and applies the step's adjoint:
    y = m / s,  s = sum_axis(m)   =>   dm = (dy - sum_axis(dy * y)) / s
Nothing per iteration goes to global memory. Registers grow with iters (2 * next_pow2(iters) * n per token), so the
tokens per program shrink as t_max grows.
and finally dz = dm0 * m0 for m0 = exp(z - max z). Reference: `mhc_train/ops/sinkhorn.py` (same recurrence in torch)
and `mhc_train/ops/reference.py::sinkhorn_knopp_ref` (autograd through the iterations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import MAX_STREAMS, check_tensor, interpreting, launch, next_pow2, tokens_per_block


@triton.jit
def _exp_shifted(z, valid):
    zmax = tl.max(tl.max(tl.where(valid, z, -float("inf")), axis=2), axis=1)
    return tl.where(valid, tl.exp(z - zmax[:, None, None]), 0.0)


@triton.jit
def _normalise(m, step, valid_j, valid_i):
    """Normalisation step `step`: even = columns (sum over rows i, axis 1), odd = rows (axis 2). Returns (y, s)."""
    col = tl.sum(m, axis=1)  # [T, j]
    row = tl.sum(m, axis=2)  # [T, i]
    col = tl.where(valid_j, col, 1.0)
    row = tl.where(valid_i, row, 1.0)
    is_col = (step % 2) == 0
    s = tl.where(is_col, col[:, None, :], row[:, :, None])  # broadcast back to [T, i, j]
    return m / s, s


@triton.jit
def _sinkhorn_fwd_core(z, iters, valid_nn, valid_i, valid_j):
    m = _exp_shifted(z, valid_nn)
    for step in range(0, 2 * iters):
        m, _ = _normalise(m, step, valid_j, valid_i)
    return m


@triton.jit
def _sinkhorn_bwd_core(z, g, iters, valid_nn, valid_i, valid_j, ITERS_PAD: tl.constexpr):
    """dz from dP for P = Sinkhorn(z), O(iters) steps per token. One forward sweep records every step's sums in
    registers ([T, ITERS_PAD, n] for the columns and for the rows: ITERS_PAD >= iters); the reverse sweep walks the
    steps backwards, undoing each one (input = output * its sums) while applying its adjoint."""
    m0 = _exp_shifted(z, valid_nn)
    it = tl.arange(0, ITERS_PAD)[None, :, None]
    hist_col = tl.zeros([m0.shape[0], ITERS_PAD, m0.shape[2]], dtype=tl.float32)
    hist_row = tl.zeros([m0.shape[0], ITERS_PAD, m0.shape[1]], dtype=tl.float32)
    m = m0
    for p in range(0, iters):
        col = tl.where(valid_j, tl.sum(m, axis=1), 1.0)  # [T, j]
        m = m / col[:, None, :]
        hist_col = tl.where(it == p, col[:, None, :], hist_col)
        row = tl.where(valid_i, tl.sum(m, axis=2), 1.0)  # [T, i]
        m = m / row[:, :, None]
        hist_row = tl.where(it == p, row[:, None, :], hist_row)
    y = m  # the output P; walk back: row step 2p+1, then column step 2p
    for back in range(0, iters):
        p = iters - 1 - back
        row = tl.sum(tl.where(it == p, hist_row, 0.0), axis=1)
        red = tl.sum(g * y, axis=2)
        g = tl.where(valid_nn, (g - red[:, :, None]) / row[:, :, None], 0.0)
        y = y * row[:, :, None]
        col = tl.sum(tl.where(it == p, hist_col, 0.0), axis=1)
        red = tl.sum(g * y, axis=1)
        g = tl.where(valid_nn, (g - red[:, None, :]) / col[:, None, :], 0.0)
        y = y * col[:, None, :]
    return g * m0


@triton.jit(do_not_specialize=["n_tokens", "iters"])
def _sinkhorn_fwd_kernel(z_ptr, out_ptr, n_tokens, iters, N: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    valid = (offs_t < n_tokens)[:, None, None] & (offs_n < N)[None, :, None] & (offs_n < N)[None, None, :]
    ptrs = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
    z = tl.load(z_ptr + ptrs, mask=valid, other=0.0)
    valid_i, valid_j = (offs_n < N)[None, :], (offs_n < N)[None, :]
    valid_nn = (offs_n < N)[None, :, None] & (offs_n < N)[None, None, :]  # tokens past the end compute on zeros
    tl.store(out_ptr + ptrs, _sinkhorn_fwd_core(z, iters, valid_nn, valid_i, valid_j), mask=valid)


@triton.jit(do_not_specialize=["n_tokens", "iters"])
def _sinkhorn_bwd_kernel(
    z_ptr,
    g_ptr,
    dz_ptr,
    n_tokens,
    iters,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ITERS_PAD: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    valid = (offs_t < n_tokens)[:, None, None] & (offs_n < N)[None, :, None] & (offs_n < N)[None, None, :]
    ptrs = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
    z = tl.load(z_ptr + ptrs, mask=valid, other=0.0)
    g = tl.load(g_ptr + ptrs, mask=valid, other=0.0)
    valid_i, valid_j = (offs_n < N)[None, :], (offs_n < N)[None, :]
    valid_nn = (offs_n < N)[None, :, None] & (offs_n < N)[None, None, :]
    tl.store(dz_ptr + ptrs, _sinkhorn_bwd_core(z, g, iters, valid_nn, valid_i, valid_j, ITERS_PAD), mask=valid)


def _block_t(n_pad: int) -> int:
    return tokens_per_block(n_pad * n_pad)


def _iters_pad(iters: int) -> int:
    return max(2, next_pow2(iters))


def _block_t_bwd(n_pad: int, iters: int) -> int:
    """Tokens per backward program: the n x n tiles plus the two [ITERS_PAD, n] sum histories, ~4k fp32 values (the
    interpreter has no registers to spare and pays per program: it takes the forward's block)."""
    if interpreting():
        return _block_t(n_pad)
    per_token = n_pad * n_pad + 2 * _iters_pad(iters) * n_pad
    return max(1, min(64, 1 << (4096 // per_token).bit_length() - 1)) if per_token <= 4096 else 1


def sinkhorn_fwd(z: torch.Tensor, iters: int) -> torch.Tensor:
    T, n, _ = z.shape
    n_pad = next_pow2(n)
    out = torch.empty_like(z)
    bt = _block_t(n_pad)
    launch(
        _sinkhorn_fwd_kernel,
        (triton.cdiv(T, bt),),
        writes=("out_ptr",),
        z_ptr=z,
        out_ptr=out,
        n_tokens=T,
        iters=iters,
        N=n,
        N_PAD=n_pad,
        BLOCK_T=bt,
    )
    return out


def sinkhorn_bwd(z: torch.Tensor, g: torch.Tensor, iters: int) -> torch.Tensor:
    T, n, _ = z.shape
    n_pad = next_pow2(n)
    dz = torch.empty_like(z)
    bt = _block_t_bwd(n_pad, iters)
    launch(
        _sinkhorn_bwd_kernel,
        (triton.cdiv(T, bt),),
        writes=("dz_ptr",),
        z_ptr=z,
        g_ptr=g,
        dz_ptr=dz,
        n_tokens=T,
        iters=iters,
        N=n,
        N_PAD=n_pad,
        BLOCK_T=bt,
        ITERS_PAD=_iters_pad(iters),
    )
    return dz


class SinkhornFunction(torch.autograd.Function):
    """Saves the logits only (n*n fp32 per token); backward recomputes every iterate on chip."""

    @staticmethod
    def forward(ctx, z, iters):
        ctx.iters = iters
        ctx.save_for_backward(z)
        return sinkhorn_fwd(z, iters)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        return sinkhorn_bwd(z, g.contiguous().float(), ctx.iters), None


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """logits [..., n, n] fp32 (contiguous) -> doubly stochastic [..., n, n] fp32. n <= 16; tested for 1, 2, 4, 8."""
    n = logits.shape[-1]
    if logits.shape[-2] != n:
        raise ValueError(f"sinkhorn_knopp expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    if n > MAX_STREAMS:
        raise ValueError(f"n = {n} is above the Triton Sinkhorn kernel's limit of {MAX_STREAMS}; use backend=torch")
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1, got {iters}")
    check_tensor("logits", logits, (torch.float32,))
    lead = logits.shape[:-2]
    return SinkhornFunction.apply(logits.reshape(-1, n, n), iters).reshape(*lead, n, n)
