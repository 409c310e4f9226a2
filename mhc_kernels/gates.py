"""The coefficient tail of mHC in one kernel: gates, biases, sigmoid, 2*sigmoid and every Sinkhorn iteration
(mHC paper Eqs. 7-9; the paper's kernels 2 and 3 fused), forward and backward, fp32.

Input: the normalised projection h = RMSNorm(vec(x)) @ phi [T, K], K = n^2 + 2n (columns [pre | post | res]), or
K = 2n for the identity-H_res arm. Per token:
    h_pre = sigmoid(a_pre * h[:n] + b_pre)      h_post = 2 sigmoid(a_post * h[n:2n] + b_post)
    h_res = SinkhornKnopp(a_res * h[2n:] (row-major n x n) + b_res)
Backward (u = gate pre-activation, s = sigmoid(u)): du_pre = dh_pre s (1 - s); du_post = 2 dh_post s (1 - s);
du_res = the Sinkhorn adjoint (O(t_max), iterates recomputed on chip, see sinkhorn.py). Then dh = a du, da = sum_t,k du h,
db = sum_t du. The token reductions for a and b are written as per-program partials and summed in a fixed order
(deterministic, no atomics). Why one kernel after the projection and not one overall: the projection is a
tensor-core matmul over the nC-wide stream, this tail is K-wide elementwise work per token; fusing them would make
every matmul program carry the Sinkhorn registers. Reference: `mhc_train/ops/reference.py::mhc_coefficients_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sinkhorn import _block_t, _block_t_bwd, _iters_pad, _sinkhorn_bwd_core, _sinkhorn_fwd_core
from .utils import MAX_STREAMS, check_tensor, launch, next_pow2


@triton.jit(do_not_specialize=["n_tokens", "iters"])
def _gates_fwd_kernel(
    h_ptr,
    a_ptr,
    b_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    n_tokens,
    iters,
    K,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mt, mn = offs_t < n_tokens, offs_n < N
    m2 = mt[:, None] & mn[None, :]
    hp = tl.load(h_ptr + offs_t[:, None] * K + offs_n[None, :], mask=m2, other=0.0)
    hq = tl.load(h_ptr + offs_t[:, None] * K + N + offs_n[None, :], mask=m2, other=0.0)
    bp = tl.load(b_ptr + offs_n, mask=mn, other=0.0)
    bq = tl.load(b_ptr + N + offs_n, mask=mn, other=0.0)
    a_pre, a_post = tl.load(a_ptr), tl.load(a_ptr + 1)
    tl.store(pre_ptr + offs_t[:, None] * N + offs_n[None, :], tl.sigmoid(a_pre * hp + bp[None, :]), mask=m2)
    tl.store(post_ptr + offs_t[:, None] * N + offs_n[None, :], 2.0 * tl.sigmoid(a_post * hq + bq[None, :]), mask=m2)
    if HAS_RES:
        valid_nn = mn[None, :, None] & mn[None, None, :]
        m3 = mt[:, None, None] & valid_nn
        ij = offs_n[None, :, None] * N + offs_n[None, None, :]
        hr = tl.load(h_ptr + offs_t[:, None, None] * K + 2 * N + ij, mask=m3, other=0.0)
        br = tl.load(b_ptr + 2 * N + ij, mask=valid_nn, other=0.0)
        z = tl.load(a_ptr + 2) * hr + br
        out = _sinkhorn_fwd_core(z, iters, valid_nn, mn[None, :], mn[None, :])
        tl.store(res_ptr + offs_t[:, None, None] * (N * N) + ij, out, mask=m3)


@triton.jit(do_not_specialize=["n_tokens", "iters"])
def _gates_bwd_kernel(
    h_ptr,
    a_ptr,
    b_ptr,
    pre_ptr,
    post_ptr,
    dpre_ptr,
    dpost_ptr,
    dres_ptr,
    dh_ptr,
    da_ptr,
    db_ptr,
    n_tokens,
    iters,
    K,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ITERS_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mt, mn = offs_t < n_tokens, offs_n < N
    m2 = mt[:, None] & mn[None, :]
    p2 = offs_t[:, None] * N + offs_n[None, :]
    hp = tl.load(h_ptr + offs_t[:, None] * K + offs_n[None, :], mask=m2, other=0.0)
    hq = tl.load(h_ptr + offs_t[:, None] * K + N + offs_n[None, :], mask=m2, other=0.0)
    s_pre = tl.load(pre_ptr + p2, mask=m2, other=0.0)  # sigmoid(u_pre), saved by forward
    s_post = tl.load(post_ptr + p2, mask=m2, other=0.0) * 0.5
    du_pre = tl.load(dpre_ptr + p2, mask=m2, other=0.0) * s_pre * (1.0 - s_pre)
    du_post = tl.load(dpost_ptr + p2, mask=m2, other=0.0) * 2.0 * s_post * (1.0 - s_post)
    a_pre, a_post = tl.load(a_ptr), tl.load(a_ptr + 1)
    tl.store(dh_ptr + offs_t[:, None] * K + offs_n[None, :], a_pre * du_pre, mask=m2)
    tl.store(dh_ptr + offs_t[:, None] * K + N + offs_n[None, :], a_post * du_post, mask=m2)
    # per-program partials: da [blocks, 3], db [blocks, K]
    tl.store(da_ptr + pid * 3, tl.sum(tl.sum(du_pre * hp, axis=1), axis=0))
    tl.store(da_ptr + pid * 3 + 1, tl.sum(tl.sum(du_post * hq, axis=1), axis=0))
    tl.store(db_ptr + pid * K + offs_n, tl.sum(du_pre, axis=0), mask=mn)
    tl.store(db_ptr + pid * K + N + offs_n, tl.sum(du_post, axis=0), mask=mn)
    if HAS_RES:
        valid_nn = mn[None, :, None] & mn[None, None, :]
        m3 = mt[:, None, None] & valid_nn
        ij = offs_n[None, :, None] * N + offs_n[None, None, :]
        hr = tl.load(h_ptr + offs_t[:, None, None] * K + 2 * N + ij, mask=m3, other=0.0)
        br = tl.load(b_ptr + 2 * N + ij, mask=valid_nn, other=0.0)
        a_res = tl.load(a_ptr + 2)
        g = tl.load(dres_ptr + offs_t[:, None, None] * (N * N) + ij, mask=m3, other=0.0)
        dz = _sinkhorn_bwd_core(a_res * hr + br, g, iters, valid_nn, mn[None, :], mn[None, :], ITERS_PAD)
        dz = tl.where(m3, dz, 0.0)
        tl.store(dh_ptr + offs_t[:, None, None] * K + 2 * N + ij, a_res * dz, mask=m3)
        tl.store(da_ptr + pid * 3 + 2, tl.sum(tl.sum(tl.sum(dz * hr, axis=2), axis=1), axis=0))
        tl.store(db_ptr + pid * K + 2 * N + ij, tl.sum(dz, axis=0)[None, :, :], mask=valid_nn)


class GatesSinkhornFunction(torch.autograd.Function):
    """Saves h (K per token) and the two sigmoid outputs (2n); recomputes the Sinkhorn iterates in backward."""

    @staticmethod
    def forward(ctx, h, alpha, bias, n, iters):
        T, K = h.shape
        has_res = K == n * n + 2 * n
        n_pad, bt = next_pow2(n), _block_t(next_pow2(n))
        pre = torch.empty(T, n, device=h.device, dtype=torch.float32)
        post = torch.empty_like(pre)
        res = torch.empty(T, n, n, device=h.device, dtype=torch.float32) if has_res else pre
        launch(
            _gates_fwd_kernel,
            (triton.cdiv(T, bt),),
            writes=("pre_ptr", "post_ptr", "res_ptr"),
            h_ptr=h,
            a_ptr=alpha,
            b_ptr=bias,
            pre_ptr=pre,
            post_ptr=post,
            res_ptr=res,
            n_tokens=T,
            iters=iters,
            K=K,
            N=n,
            N_PAD=n_pad,
            HAS_RES=has_res,
            BLOCK_T=bt,
        )
        ctx.n, ctx.iters, ctx.has_res = n, iters, has_res
        ctx.save_for_backward(h, alpha, bias, pre, post)
        return pre, post, (res if has_res else None)

    @staticmethod
    def backward(ctx, d_pre, d_post, d_res):
        h, alpha, bias, pre, post = ctx.saved_tensors
        T, K = h.shape
        n = ctx.n
        n_pad = next_pow2(n)
        bt = _block_t_bwd(n_pad, ctx.iters) if ctx.has_res else _block_t(n_pad)
        blocks = triton.cdiv(T, bt)
        # an unused output's gradient arrives as zeros (autograd materialises it), never None; d_res is None only
        # without H_res (that output is None)
        d_pre, d_post = d_pre.contiguous().float(), d_post.contiguous().float()
        if ctx.has_res:
            d_res = d_res.contiguous().float()
        dh = torch.empty_like(h)
        da = torch.empty(blocks, 3, device=h.device)  # per-program partials, every used entry written
        db = torch.empty(blocks, K, device=h.device)
        launch(
            _gates_bwd_kernel,
            (blocks,),
            writes=("dh_ptr", "da_ptr", "db_ptr"),
            h_ptr=h,
            a_ptr=alpha,
            b_ptr=bias,
            pre_ptr=pre,
            post_ptr=post,
            dpre_ptr=d_pre,
            dpost_ptr=d_post,
            dres_ptr=d_res if ctx.has_res else d_pre,
            dh_ptr=dh,
            da_ptr=da,
            db_ptr=db,
            n_tokens=T,
            iters=ctx.iters,
            K=K,
            N=n,
            N_PAD=n_pad,
            HAS_RES=ctx.has_res,
            BLOCK_T=bt,
            ITERS_PAD=_iters_pad(ctx.iters),
        )
        da = da[:, : alpha.numel()].sum(0)  # (column 2 is unwritten without H_res)
        need = ctx.needs_input_grad
        return (dh if need[0] else None, da if need[1] else None, db.sum(0) if need[2] else None, None, None)


def mhc_gates_sinkhorn(h: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n: int, iters: int = 20):
    """h [..., K] fp32 -> (h_pre [..., n], h_post [..., n], h_res [..., n, n] or None when K = 2n). n <= 16."""
    K = h.shape[-1]
    if K not in (n * n + 2 * n, 2 * n):
        raise ValueError(f"h must have n*n+2n = {n * n + 2 * n} (or 2n = {2 * n}) columns for n = {n}, got {K}")
    if n > MAX_STREAMS:
        raise ValueError(f"n = {n} is above the Triton kernels' limit of {MAX_STREAMS}; use backend=torch")
    for name, t in (("h", h), ("alpha", alpha), ("bias", bias)):
        check_tensor(name, t, (torch.float32,))
    lead = h.shape[:-1]
    pre, post, res = GatesSinkhornFunction.apply(h.reshape(-1, K), alpha, bias, n, iters)
    return pre.reshape(*lead, n), post.reshape(*lead, n), None if res is None else res.reshape(*lead, n, n)
