"""Fused stream read and write: `mhc_pre` (kernel 3) and `mhc_post_res` (kernel 4) of the mHC paper, section 4.3.

- `mhc_pre`:      F_in[t, c]  = sum_j h_pre[t, j] x[t, j, c]                    reads nC, writes C per token
- `mhc_post_res`: x'[t, i, c] = sum_j H_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c]
                                                                              reads (n+1)C, writes nC per token
HC uses the same two kernels (only its coefficients differ). Tiles are [tokens, n, C-block] with n padded to a power
of two and masked; C is masked too (any width). Accumulation in fp32; streams may be fp32, bf16 or fp16.
References: `mhc_train/ops/reference.py` (`mhc_pre_ref`, `mhc_post_res_ref`).

Backward (per token t, upstream g):
    pre:      dx[j, c] = h_pre[j] g[c]                 dh_pre[j] = sum_c x[j, c] g[c]
    post_res: dx[j, c] = sum_i H[i, j] g[i, c]         dy[c] = sum_i h_post[i] g[i, c]
              dH[i, j] = sum_c g[i, c] x[j, c]         dh_post[i] = sum_c g[i, c] y[c]
The coefficient gradients reduce over C, so backward programs own whole tokens and loop over C: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .link import SiteLink, check_linked
from .utils import MAX_STREAMS, STREAM_DTYPES, check_tensor, launch_tuned, next_pow2, stream_tile


@triton.jit(do_not_specialize=["n_tokens"])
def _mhc_pre_fwd_kernel(
    x_ptr,
    h_ptr,
    out_ptr,
    n_tokens,
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, N_PAD)
    mt, mn, mc = offs_t < n_tokens, offs_n < N, offs_c < C
    x = tl.load(
        x_ptr + offs_t[:, None, None] * (N * C) + offs_n[None, :, None] * C + offs_c[None, None, :],
        mask=mt[:, None, None] & mn[None, :, None] & mc[None, None, :],
        other=0.0,
    ).to(tl.float32)
    h = tl.load(h_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
    out = tl.sum(x * h.to(tl.float32)[:, :, None], axis=1)  # [BLOCK_T, BLOCK_C]
    tl.store(
        out_ptr + offs_t[:, None] * C + offs_c[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mt[:, None] & mc[None, :],
    )


@triton.jit(do_not_specialize=["n_tokens"])
def _mhc_pre_bwd_kernel(
    x_ptr,
    h_ptr,
    g_ptr,
    dx_ptr,
    dh_ptr,
    n_tokens,
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_DX: tl.constexpr,
):
    # WRITE_DX=False (the op is linked to its site's projection, mhc_kernels/link.py): dh_pre only; the projection's
    # backward adds h_pre g to the site's one dx.
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mt, mn = offs_t < n_tokens, offs_n < N
    h = tl.load(h_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        m3 = mt[:, None, None] & mn[None, :, None] & mc[None, None, :]
        p3 = offs_t[:, None, None] * (N * C) + offs_n[None, :, None] * C + offs_c[None, None, :]
        x = tl.load(x_ptr + p3, mask=m3, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mt[:, None] & mc[None, :], other=0.0)
        g = g.to(tl.float32)
        if WRITE_DX:
            dx = h[:, :, None] * g[:, None, :]
            tl.store(dx_ptr + p3, dx.to(dx_ptr.dtype.element_ty), mask=m3)
        dh += tl.sum(x * g[:, None, :], axis=2)
    tl.store(dh_ptr + offs_t[:, None] * N + offs_n[None, :], dh, mask=mt[:, None] & mn[None, :])


@triton.jit(do_not_specialize=["n_tokens"])
def _mhc_post_res_fwd_kernel(
    x_ptr,
    y_ptr,
    hp_ptr,
    hr_ptr,
    out_ptr,
    n_tokens,
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # HAS_RES=False compiles the identity-H_res arm (x' = x + h_post y) without the mixing. The mixing is n rank-1
    # updates out[:, i, :] += H[i, j] x[j, :] (one input stream at a time): no [T, n, n, C] product in registers.
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, N_PAD)
    mt, mn, mc = offs_t < n_tokens, offs_n < N, offs_c < C
    m_tc = mt[:, None] & mc[None, :]
    m3 = mt[:, None, None] & mn[None, :, None] & mc[None, None, :]
    p3 = offs_t[:, None, None] * (N * C) + offs_n[None, :, None] * C + offs_c[None, None, :]
    y = tl.load(y_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0)
    hp = tl.load(hp_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
    out = hp.to(tl.float32)[:, :, None] * y.to(tl.float32)[:, None, :]  # [T, i, c]
    if HAS_RES:
        for j in range(0, N):  # a loop, not unrolled: 16 unrolled loads spilled at n = 16
            xj = tl.load(x_ptr + offs_t[:, None] * (N * C) + j * C + offs_c[None, :], mask=m_tc, other=0.0)
            hj = tl.load(
                hr_ptr + offs_t[:, None] * (N * N) + offs_n[None, :] * N + j, mask=mt[:, None] & mn[None, :], other=0.0
            )  # column j of H_res: [T, i]
            out += hj[:, :, None] * xj.to(tl.float32)[:, None, :]
    else:
        out += tl.load(x_ptr + p3, mask=m3, other=0.0).to(tl.float32)
    tl.store(out_ptr + p3, out.to(out_ptr.dtype.element_ty), mask=m3)


@triton.jit(do_not_specialize=["n_tokens"])
def _mhc_post_res_bwd_kernel(
    x_ptr,
    y_ptr,
    hp_ptr,
    hr_ptr,
    g_ptr,
    dx_ptr,
    dy_ptr,
    dhp_ptr,
    dhr_ptr,
    n_tokens,
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_RES: tl.constexpr,
    WRITE_DX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # WRITE_DX=False (linked, mhc_kernels/link.py): no dx; the site's projection backward adds H_res^T g.
    # One output stream i at a time (g_i = g[:, i, :]): dy += h_post[i] g_i, dx[j] += H[i, j] g_i, and the reductions
    # over C dh_post[i] = <g_i, y>, dH[i, :] = <g_i, x[j]>. Registers hold [T, n, C] tiles only.
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mt, mn = offs_t < n_tokens, offs_n < N
    m_tn = mt[:, None] & mn[None, :]
    sel = offs_n[None, :, None]  # row index i of the [T, i, j] coefficient gradient
    dhr = tl.zeros([BLOCK_T, N_PAD, N_PAD], dtype=tl.float32)
    dhp = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        m_tc = mt[:, None] & mc[None, :]
        m3 = mt[:, None, None] & mn[None, :, None] & mc[None, None, :]
        p3 = offs_t[:, None, None] * (N * C) + offs_n[None, :, None] * C + offs_c[None, None, :]
        y = tl.load(y_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        if HAS_RES:
            x = tl.load(x_ptr + p3, mask=m3, other=0.0).to(tl.float32)  # [T, j, c]
            dx = tl.zeros([BLOCK_T, N_PAD, BLOCK_C], dtype=tl.float32)
        elif WRITE_DX:
            dx = tl.load(g_ptr + p3, mask=m3, other=0.0).to(tl.float32)  # identity H_res: dx = g
        dy = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in range(0, N):  # a loop, not unrolled: 16 unrolled loads spilled at n = 16
            gi = tl.load(g_ptr + offs_t[:, None] * (N * C) + i * C + offs_c[None, :], mask=m_tc, other=0.0)
            gi = gi.to(tl.float32)
            hpi = tl.load(hp_ptr + offs_t * N + i, mask=mt, other=0.0)
            dy += hpi[:, None] * gi
            dhp += tl.where(offs_n[None, :] == i, tl.sum(gi * y, axis=1)[:, None], 0.0)
            if HAS_RES:
                if WRITE_DX:
                    hri = tl.load(hr_ptr + offs_t[:, None] * (N * N) + i * N + offs_n[None, :], mask=m_tn, other=0.0)
                    dx += hri[:, :, None] * gi[:, None, :]  # row i of H_res: [T, j]
                dhr += tl.where(sel == i, tl.sum(x * gi[:, None, :], axis=2)[:, None, :], 0.0)
        tl.store(dy_ptr + offs_t[:, None] * C + offs_c[None, :], dy.to(dy_ptr.dtype.element_ty), mask=m_tc)
        if WRITE_DX:
            tl.store(dx_ptr + p3, dx.to(dx_ptr.dtype.element_ty), mask=m3)
    tl.store(dhp_ptr + offs_t[:, None] * N + offs_n[None, :], dhp, mask=m_tn)
    if HAS_RES:
        m_nn = mt[:, None, None] & mn[None, :, None] & mn[None, None, :]
        p_nn = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
        tl.store(dhr_ptr + p_nn, dhr, mask=m_nn)


def _candidates(n: int, C: int, bt: int, bc: int, wide: bool = True) -> list[dict]:
    """The autotune set: the rule's [bt, n, bc] tile at 4 warps, and at 8 warps either the same values per thread
    over twice the tile (`wide`: twice the channels while they fit C, else twice the tokens) or the same tile (the
    backward kernels, which hold more tiles: the compile gate spilled their doubled tile at n = 4)."""
    if not wide:
        return [dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=4), dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=8)]
    tile = dict(BLOCK_T=bt, BLOCK_C=2 * bc) if 2 * bc <= next_pow2(C) else dict(BLOCK_T=2 * bt, BLOCK_C=bc)
    return [dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=4), dict(**tile, num_warps=8)]


def _key(x: torch.Tensor, *flags) -> tuple:
    T, n, C = x.shape
    return (next_pow2(T), n, C, x.dtype, *flags)


def _check(n: int, **tensors) -> None:
    if n > MAX_STREAMS:
        raise ValueError(f"n = {n} streams is above the Triton kernels' limit of {MAX_STREAMS}; use backend=torch")
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t, STREAM_DTYPES if name in ("x", "y", "g") else (torch.float32,))


def mhc_pre_fwd(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    T, n, C = x.shape
    n_pad, bt, bc = stream_tile(n, C)
    out = torch.empty(T, C, device=x.device, dtype=x.dtype)
    launch_tuned(
        _mhc_pre_fwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"])),
        _candidates(n, C, bt, bc),
        key=_key(x),
        writes=("out_ptr",),
        x_ptr=x,
        h_ptr=h_pre,
        out_ptr=out,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
    )
    return out


def mhc_pre_bwd(x, h_pre, g, write_dx=True):
    """(dx or None, dh_pre); write_dx=False when the site's projection writes dx (a link)."""
    T, n, C = x.shape
    n_pad, bt, bc = stream_tile(n, C)
    dx, dh = (torch.empty_like(x) if write_dx else None), torch.empty_like(h_pre)
    launch_tuned(
        _mhc_pre_bwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]),),
        _candidates(n, C, bt, bc, wide=False),
        key=_key(x, g.dtype, write_dx),
        writes=("dx_ptr", "dh_ptr"),
        x_ptr=x,
        h_ptr=h_pre,
        g_ptr=g,
        dx_ptr=dx if write_dx else h_pre,  # an unwritten placeholder without dx (WRITE_DX is compile-time)
        dh_ptr=dh,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
        WRITE_DX=write_dx,
    )
    return dx, dh


def mhc_post_res_fwd(x, y, h_post, h_res):
    T, n, C = x.shape
    n_pad, bt, bc = stream_tile(n, C)
    out = torch.empty_like(x)
    has_res = h_res is not None
    launch_tuned(
        _mhc_post_res_fwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"])),
        _candidates(n, C, bt, bc),
        key=_key(x, y.dtype, has_res),
        writes=("out_ptr",),
        x_ptr=x,
        y_ptr=y,
        hp_ptr=h_post,
        hr_ptr=h_res if has_res else h_post,
        out_ptr=out,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
        HAS_RES=has_res,
    )
    return out


def mhc_post_res_bwd(x, y, h_post, h_res, g, write_dx=True):
    """(dx or None, dy, dh_post, dh_res or None); write_dx=False when the site's projection writes dx (a link)."""
    T, n, C = x.shape
    n_pad, bt, bc = stream_tile(n, C)
    if not write_dx and bt == 1:  # n = 16 without the dx tile: twice the channels (the compile gate: fp32 streams
        bc = min(2 * bc, next_pow2(C))  # spilled 12 B at 48 registers with 64 on sm_90; n <= 2 spilled with 2x)
    has_res = h_res is not None
    dx = torch.empty_like(x) if write_dx else None
    dy, dhp = torch.empty_like(y), torch.empty_like(h_post)
    dhr = torch.empty_like(h_res) if has_res else None
    launch_tuned(
        _mhc_post_res_bwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]),),
        _candidates(n, C, bt, bc)[:1],  # one: the gate spilled every 8-warp variant tried (n = 4, 8)
        key=_key(x, y.dtype, has_res, write_dx),
        writes=("dx_ptr", "dy_ptr", "dhp_ptr", "dhr_ptr"),
        x_ptr=x,
        y_ptr=y,
        hp_ptr=h_post,
        hr_ptr=h_res if has_res else h_post,
        g_ptr=g,
        dx_ptr=dx if write_dx else dy,  # an unwritten placeholder without dx (WRITE_DX is compile-time)
        dy_ptr=dy,
        dhp_ptr=dhp,
        dhr_ptr=dhr if has_res else dhp,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
        HAS_RES=has_res,
        WRITE_DX=write_dx,
    )
    return dx, dy, dhp, dhr


class MhcPreFunction(torch.autograd.Function):
    """Saves x and h_pre (the inputs; no intermediates). With a link (mhc_kernels/link.py) the backward writes no dx:
    it hands (dF_in, h_pre) to the site's projection, whose backward writes the site's one dx."""

    @staticmethod
    def forward(ctx, x, h_pre, link):
        ctx.link = link
        ctx.save_for_backward(x, h_pre)
        return mhc_pre_fwd(x, h_pre)

    @staticmethod
    def backward(ctx, g):
        x, h_pre = ctx.saved_tensors
        g = g.contiguous()
        linked = ctx.link is not None
        dx, dh = mhc_pre_bwd(x, h_pre, g, write_dx=ctx.needs_input_grad[0] and not linked)
        if linked and ctx.needs_input_grad[0]:
            ctx.link.give("pre", g, h_pre)
        return dx, (dh if ctx.needs_input_grad[1] else None), None


class MhcPostResFunction(torch.autograd.Function):
    """Saves x, y, h_post, h_res (the inputs; no intermediates). With a link the backward writes no dx: it hands
    (g, h_res) to the site's projection."""

    @staticmethod
    def forward(ctx, x, y, h_post, h_res, link):
        ctx.link = link
        ctx.save_for_backward(x, y, h_post, h_res)
        return mhc_post_res_fwd(x, y, h_post, h_res)

    @staticmethod
    def backward(ctx, g):
        x, y, h_post, h_res = ctx.saved_tensors
        g = g.contiguous()
        need, linked = ctx.needs_input_grad, ctx.link is not None
        dx, dy, dhp, dhr = mhc_post_res_bwd(x, y, h_post, h_res, g, write_dx=need[0] and not linked)
        if linked and need[0]:
            ctx.link.give("post_res", g, h_res)
        return (dx, dy if need[1] else None, dhp if need[2] else None, dhr if need[3] else None, None)


def _join(link: SiteLink | None, op: str) -> SiteLink | None:
    if link is not None:
        link.join(op)
    return link


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor, link: SiteLink | None = None) -> torch.Tensor:
    """x [..., n, C] (fp32/bf16/fp16, contiguous), h_pre [..., n] fp32 -> [..., C] in x's dtype. n <= 16.

    `link`: the site's `SiteLink` (mhc_kernels/link.py): x's gradient from this op is added by the site's projection
    backward instead of written here."""
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    _check(n, x=x, h_pre=h_pre)
    check_linked(link, x, h_pre=h_pre)
    out = MhcPreFunction.apply(x.reshape(-1, n, C), h_pre.reshape(-1, n), _join(link, "pre"))
    return out.reshape(*lead, C)


def mhc_post_res(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor | None,
    link: SiteLink | None = None,
) -> torch.Tensor:
    """x [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] fp32 or None -> [..., n, C] in x's dtype.
    y may be in another stream dtype than x (F's bf16 output onto fp32 streams): it is widened in the kernel, not by
    a copy; its gradient comes back in y's dtype. `link`: as in `mhc_pre`."""
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    _check(n, x=x, y=y, h_post=h_post, h_res=h_res)
    check_linked(link, x, h_post=h_post, h_res=h_res)
    out = MhcPostResFunction.apply(
        x.reshape(-1, n, C),
        y.reshape(-1, C),
        h_post.reshape(-1, n),
        None if h_res is None else h_res.reshape(-1, n, n),
        _join(link, "post_res"),
    )
    return out.reshape(*lead, n, C)
