"""HC's dynamic coefficient tail in one kernel, forward and backward, fp32 (HC paper, 2409.19606, dynamic HC).

Input: the per-stream projection h = RMSNorm(x_j) @ W [T, n, K_s], K_s = n + 2 (columns [A_m | B | A_r row]), the
static part [n, K_s] (row j: static A_m[j], B[j], A_r[j, :]) and the gate scales [K_s] ([s_alpha, s_beta,
s_alpha x n]). Per token:
    block[j, k] = tanh(h[j, k]) * scale[k] + static[j, k]
    h_pre[j] = block[j, 0]     h_post[j] = block[j, 1]     h_res[i, j] = block[j, 2 + i]   (H_res = A_r^T)
Backward (dblock gathered from the three upstream gradients the same way):
    dh = dblock * scale * (1 - tanh^2);  dscale[k] = sum_{t, j} dblock tanh;  dstatic[j, k] = sum_t dblock
The token sums are per-program partials summed in a fixed order afterwards (deterministic, no atomics).
Replaces 8 torch ops forward and about 15 backward (with their launches). Reference:
`mhc_train/ops/reference.py::hc_gates_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import MAX_STREAMS, check_tensor, launch, next_pow2, tokens_per_block


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter and every Triton release have it): odd series below |x| = 0.1, where
    (1 - e^-2|x|) / (1 + e^-2|x|) would cancel; relative error ~1e-7 either side."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit(do_not_specialize=["n_tokens"])
def _hc_gates_fwd_kernel(
    h_ptr,
    static_ptr,
    scale_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    n_tokens,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    KS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    K_S: tl.constexpr = N + 2
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    j = tl.arange(0, N_PAD)[None, :, None]
    k = tl.arange(0, KS_PAD)[None, None, :]
    t = offs_t[:, None, None]
    m = (t < n_tokens) & (j < N) & (k < K_S)
    th = _tanh(tl.load(h_ptr + t * (N * K_S) + j * K_S + k, mask=m, other=0.0))
    scale = tl.load(scale_ptr + k, mask=k < K_S, other=0.0)
    static = tl.load(static_ptr + j * K_S + k, mask=(j < N) & (k < K_S), other=0.0)
    block = th * scale + static
    tl.store(pre_ptr + t * N + j + k, block, mask=m & (k == 0))  # column 0: h_pre[t, j]
    tl.store(post_ptr + t * N + j + (k - 1), block, mask=m & (k == 1))  # column 1: h_post[t, j]
    tl.store(res_ptr + t * (N * N) + (k - 2) * N + j, block, mask=m & (k >= 2))  # column 2 + i: h_res[t, i, j]


@triton.jit(do_not_specialize=["n_tokens"])
def _hc_gates_bwd_kernel(
    h_ptr,
    scale_ptr,
    dpre_ptr,
    dpost_ptr,
    dres_ptr,
    dh_ptr,
    dscale_ptr,
    dstatic_ptr,
    n_tokens,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    KS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    K_S: tl.constexpr = N + 2
    pid = tl.program_id(0)
    offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    j = tl.arange(0, N_PAD)[None, :, None]
    k = tl.arange(0, KS_PAD)[None, None, :]
    t = offs_t[:, None, None]
    m = (t < n_tokens) & (j < N) & (k < K_S)
    p = t * (N * K_S) + j * K_S + k
    dblock = tl.load(dpre_ptr + t * N + j + k, mask=m & (k == 0), other=0.0)
    dblock += tl.load(dpost_ptr + t * N + j + (k - 1), mask=m & (k == 1), other=0.0)
    dblock += tl.load(dres_ptr + t * (N * N) + (k - 2) * N + j, mask=m & (k >= 2), other=0.0)
    th = _tanh(tl.load(h_ptr + p, mask=m, other=0.0))
    scale = tl.load(scale_ptr + k, mask=k < K_S, other=0.0)
    tl.store(dh_ptr + p, dblock * scale * (1.0 - th * th), mask=m)
    dscale = tl.sum(tl.sum(dblock * th, axis=1), axis=0)  # [KS_PAD]
    offs_k = tl.arange(0, KS_PAD)
    tl.store(dscale_ptr + pid * K_S + offs_k, dscale, mask=offs_k < K_S)
    dstatic = tl.sum(dblock, axis=0)  # [N_PAD, KS_PAD]
    jj, kk = tl.arange(0, N_PAD)[:, None], offs_k[None, :]
    tl.store(dstatic_ptr + pid * (N * K_S) + jj * K_S + kk, dstatic, mask=(jj < N) & (kk < K_S))


def _config(n: int) -> dict:
    n_pad, ks_pad = next_pow2(n), next_pow2(n + 2)
    return dict(N=n, N_PAD=n_pad, KS_PAD=ks_pad, BLOCK_T=tokens_per_block(n_pad * ks_pad))


class HcGatesFunction(torch.autograd.Function):
    """Saves h (n(n+2) per token) and the scales; tanh is recomputed in the backward."""

    @staticmethod
    def forward(ctx, h, static, scale):
        T, n, _ = h.shape
        cfg = _config(n)
        pre = torch.empty(T, n, device=h.device, dtype=torch.float32)
        post = torch.empty_like(pre)
        res = torch.empty(T, n, n, device=h.device, dtype=torch.float32)
        launch(
            _hc_gates_fwd_kernel,
            (triton.cdiv(T, cfg["BLOCK_T"]),),
            writes=("pre_ptr", "post_ptr", "res_ptr"),
            h_ptr=h,
            static_ptr=static,
            scale_ptr=scale,
            pre_ptr=pre,
            post_ptr=post,
            res_ptr=res,
            n_tokens=T,
            **cfg,
        )
        ctx.save_for_backward(h, scale)
        return pre, post, res

    @staticmethod
    def backward(ctx, d_pre, d_post, d_res):
        h, scale = ctx.saved_tensors
        T, n, k_s = h.shape
        cfg = _config(n)
        blocks = triton.cdiv(T, cfg["BLOCK_T"])
        # an unused output's gradient arrives as zeros (autograd materialises it), never None
        d_pre, d_post, d_res = (d.contiguous().float() for d in (d_pre, d_post, d_res))
        dh = torch.empty_like(h)
        dscale = torch.empty(blocks, k_s, device=h.device)
        dstatic = torch.empty(blocks, n, k_s, device=h.device)
        launch(
            _hc_gates_bwd_kernel,
            (blocks,),
            writes=("dh_ptr", "dscale_ptr", "dstatic_ptr"),
            h_ptr=h,
            scale_ptr=scale,
            dpre_ptr=d_pre,
            dpost_ptr=d_post,
            dres_ptr=d_res,
            dh_ptr=dh,
            dscale_ptr=dscale,
            dstatic_ptr=dstatic,
            n_tokens=T,
            **cfg,
        )
        need = ctx.needs_input_grad
        return (dh if need[0] else None, dstatic.sum(0) if need[1] else None, dscale.sum(0) if need[2] else None)


def hc_gates(h: torch.Tensor, static: torch.Tensor, scale: torch.Tensor):
    """h [..., n, n+2] fp32, static [n, n+2], scale [n+2] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n])."""
    lead, (n, k_s) = h.shape[:-2], h.shape[-2:]
    if k_s != n + 2 or static.shape != (n, k_s) or scale.shape != (k_s,):
        raise ValueError(
            f"hc_gates: h must be [..., n, n+2] with static [n, n+2] and scale [n+2], got {tuple(h.shape)}, "
            f"{tuple(static.shape)}, {tuple(scale.shape)}"
        )
    if n > MAX_STREAMS:
        raise ValueError(f"n = {n} is above the Triton kernels' limit of {MAX_STREAMS}; use backend=torch")
    for name, t in (("h", h), ("static", static), ("scale", scale)):
        check_tensor(name, t, (torch.float32,))
    pre, post, res = HcGatesFunction.apply(h.reshape(-1, n, k_s), static, scale)
    return pre.reshape(*lead, n), post.reshape(*lead, n), res.reshape(*lead, n, n)
