"""Single-pass (lagged) mHC, DeepSeek-V4.1 (docs/mhc.md section 10): the site's read and write on the packed state.

The arm's state is [T, n + 1, C]: rows 0..n-1 the streams x, row n the read mix m carried from the previous site (its
first n channels; zeros after). Per site two stream passes, each one kernel:
- `sp_read`:  F_in[t, c] = sum_j m[t, j] x[t, j, c]   and   h = (v @ phi) / r, r = sqrt(sum(v^2) / nC + eps)
              (v = vec(x), the reordered RMSNorm of projection.py), in ONE pass over x: the mix is known before the site
              runs, so F's input needs no coefficient first. Reads nC (+ n), writes C + K + 1 per token.
- `sp_write`: x'[t, i, c] = sum_j H_res[t, i, j] x[t, j, c] + h_post[t, i] y[t, c] (rows 0..n-1) and row n = the next
              mix (this site's H_pre), zero-padded: the packed state of the next site in one pass. Reads (n + 1)C,
              writes (n + 1)C per token.
Tiles as in stream_mix.py / projection.py: fp32 accumulation, tf32 tensor-core dots on GPU (exact fp32 in the
interpreter), C masked (any width), n <= 16. The read walks channel blocks outside and streams inside, so F_in's tile
is complete after each channel block (stored by the K-tile-0 program only).
References: `mhc_train/ops/single_pass.py` (`single_pass_read_ref`, `single_pass_write_ref`); the backward is there.
The backward kernels' launches are in `single_pass_bwd.py` (this file: the kernels and the forward's launches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch, launch_tuned, next_pow2, stream_tile


@triton.jit
def _read_row(v, mj, rows, mc, offs_k, mk, phi_ptr, K, acc, ss, fin):
    """One stream row j of a token block's read, v [T, C block] fp32 as stored: the projection's dot with phi's rows,
    the sum of squares, and F_in's term m_j v. Shared by the read and the fused boundary kernel (the same bits)."""
    p = tl.load(phi_ptr + rows[:, None] * K + offs_k[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
    acc = tl.dot(v, p, acc, input_precision="tf32")
    ss += tl.sum(v * v, axis=1)
    fin += mj[:, None] * v
    return acc, ss, fin


@triton.jit(do_not_specialize=["n_tokens"])
def _sp_read_fwd_kernel(
    s_ptr,
    phi_ptr,
    fin_ptr,
    h_ptr,
    r_ptr,
    n_tokens,
    C,
    K,
    eps,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mt, mk = offs_t < n_tokens, offs_k < K
    S = (N + 1) * C  # a token's row of the packed state
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        m_tc = mt[:, None] & mc[None, :]
        fin = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for j in range(0, N):  # a loop, not unrolled (n = 16)
            v = tl.load(s_ptr + offs_t[:, None] * S + j * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
            mj = tl.load(s_ptr + offs_t * S + N * C + j, mask=mt, other=0.0).to(tl.float32)  # the carried mix
            acc, ss, fin = _read_row(v, mj, j * C + offs_c, mc, offs_k, mk, phi_ptr, K, acc, ss, fin)
        if pid_k == 0:
            tl.store(fin_ptr + offs_t[:, None] * C + offs_c[None, :], fin.to(fin_ptr.dtype.element_ty), mask=m_tc)
    r = tl.sqrt(ss / (N * C) + eps)
    acc = acc / r[:, None]
    if pid_k == 0:
        tl.store(r_ptr + offs_t, r, mask=mt)
    tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], acc, mask=mt[:, None] & mk[None, :])


@triton.jit(do_not_specialize=["n_tokens"])
def _sp_write_fwd_kernel(
    s_ptr,
    y_ptr,
    hp_ptr,
    hr_ptr,
    mix_ptr,
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
    m_tc = mt[:, None] & mc[None, :]
    m_tn = mt[:, None] & mn[None, :]
    S = (N + 1) * C
    y = tl.load(y_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0)
    hp = tl.load(hp_ptr + offs_t[:, None] * N + offs_n[None, :], mask=m_tn, other=0.0)
    out = hp.to(tl.float32)[:, :, None] * y.to(tl.float32)[:, None, :]  # [T, i, c]
    for j in range(0, N):  # rank-1 updates, one input stream at a time (stream_mix.py)
        xj = tl.load(s_ptr + offs_t[:, None] * S + j * C + offs_c[None, :], mask=m_tc, other=0.0)
        hj = tl.load(hr_ptr + offs_t[:, None] * (N * N) + offs_n[None, :] * N + j, mask=m_tn, other=0.0)
        out += hj[:, :, None] * xj.to(tl.float32)[:, None, :]
    p3 = offs_t[:, None, None] * S + offs_n[None, :, None] * C + offs_c[None, None, :]
    tl.store(out_ptr + p3, out.to(out_ptr.dtype.element_ty), mask=m_tn[:, :, None] & mc[None, None, :])
    # row n: the next site's read mix in its first n channels, zeros after
    mix = tl.load(mix_ptr + offs_t[:, None] * N + offs_c[None, :], mask=mt[:, None] & (offs_c < N)[None, :], other=0.0)
    tl.store(out_ptr + offs_t[:, None] * S + N * C + offs_c[None, :], mix.to(out_ptr.dtype.element_ty), mask=m_tc)


def _read_config(n: int, C: int, K: int) -> dict:
    """tl.dot needs every tile side >= 16; one K tile up to 128 columns (n <= 10), so x is read once there. The
    interpreter gets small tiles (it is slow per element, not per program). GPU: [32 tokens, 32 channels] at 8 warps
    (the compile gate: 64 channels at 4 warps spilled 8-360 B at n = 2..16, the F_in tile beside the dot's)."""
    block_c = max(16, min(64, next_pow2(C)))
    block_k = min(32 if interpreting() else 128, max(16, next_pow2(K)))
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_C=min(block_c, 32), BLOCK_K=block_k, num_warps=4, num_stages=1)
    return dict(BLOCK_T=32, BLOCK_C=min(block_c, 32), BLOCK_K=block_k, num_warps=8, num_stages=3)


def sp_read_fwd(state: torch.Tensor, phi: torch.Tensor, eps: float):
    """state [T, n+1, C], phi [nC, K] fp32 -> (F_in [T, C] in the state's dtype, h [T, K] fp32, r [T] fp32)."""
    T, rows, C = state.shape
    n, K = rows - 1, phi.shape[1]
    f_in = torch.empty(T, C, device=state.device, dtype=state.dtype)
    h = torch.empty(T, K, device=state.device, dtype=torch.float32)
    r = torch.empty(T, device=state.device, dtype=torch.float32)
    cfg = _read_config(n, C, K)
    launch(
        _sp_read_fwd_kernel,
        (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(K, cfg["BLOCK_K"])),
        writes=("fin_ptr", "h_ptr", "r_ptr"),
        s_ptr=state,
        phi_ptr=phi,
        fin_ptr=f_in,
        h_ptr=h,
        r_ptr=r,
        n_tokens=T,
        C=C,
        K=K,
        eps=eps,
        N=n,
        **cfg,
    )
    return f_in, h, r


def sp_write_fwd(state, y, h_post, h_res, mix):
    """state [T, n+1, C], y [T, C], h_post [T, n], h_res [T, n, n], mix [T, n] fp32 -> the next state [T, n+1, C]."""
    T, rows, C = state.shape
    n = rows - 1
    n_pad, bt, bc = stream_tile(n, C)
    out = torch.empty_like(state)
    wide = dict(BLOCK_T=bt, BLOCK_C=2 * bc) if 2 * bc <= next_pow2(C) else dict(BLOCK_T=2 * bt, BLOCK_C=bc)
    launch_tuned(
        _sp_write_fwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(C, cfg["BLOCK_C"])),
        [dict(BLOCK_T=bt, BLOCK_C=bc, num_warps=4), dict(**wide, num_warps=8)],
        key=(next_pow2(T), n, C, state.dtype, y.dtype),
        writes=("out_ptr",),
        s_ptr=state,
        y_ptr=y,
        hp_ptr=h_post,
        hr_ptr=h_res,
        mix_ptr=mix,
        out_ptr=out,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
    )
    return out


# ---- backward ----
# Per site, upstream g = dL/d(next state) [T, n+1, C], dF_in, dh (the coefficients' gradient). The write's backward
# reads g, x, y and writes dy, dh_post, dH_res (no dx); it hands (g, H_res) to the read's backward, which writes the
# site's one gradient of the packed state (the other arms' one-dx chaining):
#     ds[j, c] = dproj @ phi^T + s v + m_j dF_in[c] + sum_i H_res[i, j] g[i, c]     (rows j < n)
#     ds[n, :] = [dm, 0 ...],  dm_j = sum_c x[j, c] dF_in[c]    (the carried mix's gradient: per-block partials)
# with dproj = dh / r and s = -sum_k(dh h) / r^2 / nC from projection.py's prep kernel; dphi = v^T dproj in a
# two-stage reduction over token splits (projection.py's scheme).


@triton.jit(do_not_specialize=["n_tokens"])
def _sp_write_bwd_kernel(
    s_ptr,
    y_ptr,
    hp_ptr,
    g_ptr,
    dy_ptr,
    dhp_ptr,
    dhr_ptr,
    n_tokens,
    C,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # stream_mix.py's post_res backward without dx, on the packed state and its packed gradient
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, N_PAD)
    mt, mn = offs_t < n_tokens, offs_n < N
    m_tn = mt[:, None] & mn[None, :]
    S = (N + 1) * C
    sel = offs_n[None, :, None]
    dhr = tl.zeros([BLOCK_T, N_PAD, N_PAD], dtype=tl.float32)
    dhp = tl.zeros([BLOCK_T, N_PAD], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        m_tc = mt[:, None] & mc[None, :]
        m3 = m_tn[:, :, None] & mc[None, None, :]
        x = tl.load(s_ptr + offs_t[:, None, None] * S + offs_n[None, :, None] * C + offs_c[None, None, :], mask=m3)
        x = tl.where(m3, x.to(tl.float32), 0.0)
        y = tl.load(y_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        dy = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in range(0, N):
            gi = tl.load(g_ptr + offs_t[:, None] * S + i * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
            hpi = tl.load(hp_ptr + offs_t * N + i, mask=mt, other=0.0)
            dy += hpi[:, None] * gi
            dhp += tl.where(offs_n[None, :] == i, tl.sum(gi * y, axis=1)[:, None], 0.0)
            dhr += tl.where(sel == i, tl.sum(x * gi[:, None, :], axis=2)[:, None, :], 0.0)
        tl.store(dy_ptr + offs_t[:, None] * C + offs_c[None, :], dy.to(dy_ptr.dtype.element_ty), mask=m_tc)
    tl.store(dhp_ptr + offs_t[:, None] * N + offs_n[None, :], dhp, mask=m_tn)
    m_nn = m_tn[:, :, None] & mn[None, None, :]
    p_nn = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
    tl.store(dhr_ptr + p_nn, dhr, mask=m_nn)


@triton.jit(do_not_specialize=["n_tokens", "tokens_per_split"])
def _sp_read_bwd_kernel(
    s_ptr,
    mix_ptr,
    phi_ptr,
    dproj_ptr,
    sc_ptr,
    g_ptr,
    hres_ptr,
    fg_ptr,
    dmix_ptr,
    ds_ptr,
    dphi_ptr,
    n_tokens,
    tokens_per_split,
    C,
    K,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    WRITE_DS: tl.constexpr,
    WRITE_DPHI: tl.constexpr,
    LINK_RES: tl.constexpr,
    ONE_K_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # projection.py's backward kernel on the packed state (rows j < n of a token's row are vec(x)), with the read's
    # mix term always on and the row n of the gradient written by the K-tile-0 programs.
    R: tl.constexpr = N_PAD * BLOCK_C
    pid_c, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = tl.arange(0, N_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mn, mc = offs_n < N, offs_c < C
    S = (N + 1) * C
    offs_r = tl.reshape(offs_n[:, None] * C + offs_c[None, :], [R])  # rows (j, c): of phi, and within a state row
    mr = tl.reshape(mn[:, None] & mc[None, :], [R])
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < K
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, n_tokens)
    if ONE_K_TILE:
        p_own = tl.load(phi_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    acc = tl.zeros([R, BLOCK_K], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mt = offs_t < t_end
        m_tr = mt[:, None] & mr[None, :]
        v = tl.load(s_ptr + offs_t[:, None] * S + offs_r[None, :], mask=m_tr, other=0.0).to(tl.float32)
        dp = tl.load(dproj_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        if WRITE_DPHI:
            acc = tl.dot(tl.trans(v), dp, acc, input_precision="tf32")
        if WRITE_DS and pid_k == 0:
            if ONE_K_TILE:
                dv = tl.dot(dp, tl.trans(p_own), tl.zeros([BLOCK_T, R], dtype=tl.float32), input_precision="tf32")
            else:
                dv = tl.zeros([BLOCK_T, R], dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_j = k0 + tl.arange(0, BLOCK_K)
                    mj = offs_j < K
                    dpj = tl.load(
                        dproj_ptr + offs_t[:, None] * K + offs_j[None, :], mask=mt[:, None] & mj[None, :], other=0.0
                    )
                    pj = tl.load(
                        phi_ptr + offs_r[:, None] * K + offs_j[None, :], mask=mr[:, None] & mj[None, :], other=0.0
                    )
                    dv = tl.dot(dpj, tl.trans(pj), dv, input_precision="tf32")
            dv += tl.load(sc_ptr + offs_t, mask=mt, other=0.0)[:, None] * v
            if LINK_RES:  # H_res^T g, one output stream i at a time
                cols = tl.reshape(tl.broadcast_to(offs_c[None, :], [N_PAD, BLOCK_C]), [R])
                js = tl.reshape(tl.broadcast_to(offs_n[:, None], [N_PAD, BLOCK_C]), [R])
                for i in range(0, N):
                    gi = tl.load(g_ptr + offs_t[:, None] * S + i * C + cols[None, :], mask=m_tr, other=0.0)
                    hri = tl.load(hres_ptr + offs_t[:, None] * (N * N) + i * N + js[None, :], mask=m_tr, other=0.0)
                    dv += hri * gi.to(tl.float32)
            m_tc = mt[:, None] & mc[None, :]
            fg = tl.load(fg_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
            mix = tl.load(mix_ptr + offs_t[:, None] * S + offs_n[None, :], mask=mt[:, None] & mn[None, :])
            mix = tl.where(mt[:, None] & mn[None, :], mix.to(tl.float32), 0.0)
            dv += tl.reshape(mix[:, :, None] * fg[:, None, :], [BLOCK_T, R])
            tl.store(ds_ptr + offs_t[:, None] * S + offs_r[None, :], dv.to(ds_ptr.dtype.element_ty), mask=m_tr)
            # the mix's gradient over this channel block (a partial: the launcher sums the blocks into row n), and
            # row n itself zero here
            dmp = tl.sum(tl.reshape(v, [BLOCK_T, N_PAD, BLOCK_C]) * fg[:, None, :], axis=2)  # [T, n]
            m_tn = mt[:, None] & mn[None, :]
            tl.store(dmix_ptr + (pid_c * n_tokens + offs_t[:, None]) * N + offs_n[None, :], dmp, mask=m_tn)
            zero = tl.zeros([BLOCK_T, BLOCK_C], dtype=ds_ptr.dtype.element_ty)
            tl.store(ds_ptr + offs_t[:, None] * S + N * C + offs_c[None, :], zero, mask=m_tc)
    if WRITE_DPHI:
        dphi = dphi_ptr + pid_s.to(tl.int64) * (N * C) * K + offs_r[:, None] * K + offs_k[None, :]
        tl.store(dphi, acc, mask=mr[:, None] & mk[None, :])
