"""Coefficient projection with the reordered RMSNorm (mHC paper kernel 1, Eqs. 14-16), forward and backward; also
HC's dynamic projection (per-stream norm) and the owner of a site's single dx (`mhc_kernels/link.py`).

Forward, one pass over v = vec(x) (nC per token; streams fp32/bf16/fp16, phi and accumulation fp32):
    proj = v @ phi,  ss = sum(v^2),  r = sqrt(ss / D + eps),  h = proj / r          (D = nC, K = n^2 + 2n)
`per_stream=True` (HC): each stream has its own norm, r_j = sqrt(sum_c x_j^2 / C + eps), and phi is block-diagonal
([nC, n K_s], stream j's block in columns j K_s .. (j+1) K_s), so h[j K_s + k] = (x_j @ phi_j)[k] / r_j: HC's
RMSNorm-then-project for all n streams in the same single pass.
Grid [token blocks, K tiles]: K is tiled (BLOCK_K <= 128), so n = 16 (K = 288) needs no 512-wide tile; each K tile
re-reads its token block of v (once per tile: 1 read at n <= 8 with the GPU config, 3 at n = 16). The loop walks
stream by stream, so every load is a run of one stream's channels.
The matmuls run on tensor cores: `tl.dot(..., input_precision="tf32")` on fp32 operands (bf16/fp16 streams are
widened exactly), fp32 accumulation. TF32 keeps 10 mantissa bits per operand, so each product carries a relative
error of at most ~2^-10: |h - h_exact| <= 2^-10 * (|v| @ |phi|) / r plus fp32 accumulation (tested against fp64 with
that bound in tests/kernels/test_kernels.py). The interpreter computes the dots in exact fp32.
Saved for backward: r (1, or n with per_stream, per token) and h (K per token).

Backward, upstream gh [T, K] (r_k: the norm of column k's stream group; D_k its width, D or C):
    dproj = gh / r_k;  dv = dproj @ phi^T - sum_k(gh_k h_k) / r^2 / D_k * v  (sum over the group);  dphi = v^T @ dproj
With a `SiteLink` the same kernel adds the site's other two terms, so x gets one gradient, written once:
    dx = dv + H_res^T g + h_pre (x) dF_in          (g: the site output's gradient; dF_in: the sub-layer input's)
One kernel, grid [C blocks, K tiles, token splits]. A program owns rows (j, c) for all n streams j and a block of
channels c: a [n * BLOCK_C, BLOCK_K] tile of dphi, accumulated in registers over the tokens of its split. The
K-tile-0 program of each C block also writes dx for those rows: it reads its tile of g once for all n output streams
(H_res^T g), and phi's rows once per program when K fits one tile. dphi is a two-stage reduction: each split writes
its partial to a [splits, D, K] buffer, summed in a fixed order afterwards. No atomics, so dphi is bit-reproducible
(there is no other variant to choose), and the scratch is splits * D * K * 4 bytes (splits <= 16, chosen to fill the
GPU once).
Reference: `mhc_train/ops/reference.py::mhc_projection_ref` (and `hc_projection_ref`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .link import SiteLink
from .utils import (
    MAX_STREAMS,
    STREAM_DTYPES,
    check_tensor,
    interpreting,
    launch,
    launch_tuned,
    next_pow2,
    sm_count,
    tokens_per_block,
)


@triton.jit(do_not_specialize=["n_tokens"])
def _projection_fwd_kernel(
    v_ptr,
    phi_ptr,
    h_ptr,
    r_ptr,
    n_tokens,
    C,
    K,
    eps,
    N: tl.constexpr,
    PER_STREAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mt, mk = offs_t < n_tokens, offs_k < K
    D = N * C
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    if PER_STREAM:  # stream by stream: stream j's columns (phi is block-diagonal) are divided by its own norm
        for j in range(0, N):
            part = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            ss = tl.zeros([BLOCK_T], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = offs_c < C
                v = tl.load(
                    v_ptr + offs_t[:, None] * D + j * C + offs_c[None, :], mask=mt[:, None] & mc[None, :], other=0.0
                ).to(tl.float32)
                rows = j * C + offs_c
                p = tl.load(phi_ptr + rows[:, None] * K + offs_k[None, :], mask=mc[:, None] & mk[None, :], other=0.0)
                part = tl.dot(v, p, part, input_precision="tf32")
                ss += tl.sum(v * v, axis=1)
            r = tl.sqrt(ss / C + eps)
            acc += part / r[:, None]  # part is zero outside stream j's columns
            if pid_k == 0:
                tl.store(r_ptr + offs_t * N + j, r, mask=mt)
    else:  # one pass over the nC-wide row
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_C):
            offs_d = d0 + tl.arange(0, BLOCK_C)
            md = offs_d < D
            v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
            v = v.to(tl.float32)
            p = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :], mask=md[:, None] & mk[None, :], other=0.0)
            acc = tl.dot(v, p, acc, input_precision="tf32")
            ss += tl.sum(v * v, axis=1)
        r = tl.sqrt(ss / D + eps)
        acc = acc / r[:, None]
        if pid_k == 0:
            tl.store(r_ptr + offs_t, r, mask=mt)
    tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], acc, mask=mt[:, None] & mk[None, :])


@triton.jit(do_not_specialize=["n_tokens"])
def _projection_bwd_prep_kernel(
    gh_ptr,
    h_ptr,
    r_ptr,
    dproj_ptr,
    s_ptr,
    n_tokens,
    K,
    K_S,
    width,
    GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    KS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Per token, per norm group g (1 group of K columns, or n groups of K_S with per_stream): dproj = gh / r_g and
    # s_g = -sum_k(gh h) / r_g^2 / width, the coefficients the backward kernel reads instead of r and h.
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_g, offs_k = tl.arange(0, G_PAD), tl.arange(0, KS_PAD)
    m_tg = (offs_t < n_tokens)[:, None] & (offs_g < GROUPS)[None, :]
    m = m_tg[:, :, None] & (offs_k < K_S)[None, None, :]
    p = offs_t[:, None, None] * K + offs_g[None, :, None] * K_S + offs_k[None, None, :]
    gh = tl.load(gh_ptr + p, mask=m, other=0.0)
    h = tl.load(h_ptr + p, mask=m, other=0.0)
    r = tl.load(r_ptr + offs_t[:, None] * GROUPS + offs_g[None, :], mask=m_tg, other=1.0)
    tl.store(dproj_ptr + p, gh / r[:, :, None], mask=m)
    s = -tl.sum(gh * h, axis=2) / (r * r) / width
    tl.store(s_ptr + offs_t[:, None] * GROUPS + offs_g[None, :], s, mask=m_tg)


@triton.jit(do_not_specialize=["n_tokens", "tokens_per_split"])
def _projection_bwd_kernel(
    v_ptr,
    phi_ptr,
    dproj_ptr,
    s_ptr,
    g_ptr,
    hres_ptr,
    fg_ptr,
    hpre_ptr,
    dv_ptr,
    dphi_ptr,
    n_tokens,
    tokens_per_split,
    C,
    K,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    PER_STREAM: tl.constexpr,
    WRITE_DV: tl.constexpr,
    WRITE_DPHI: tl.constexpr,
    LINK_RES: tl.constexpr,
    LINK_PRE: tl.constexpr,
    ONE_K_TILE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dproj = gh / r per column and s = the norm's coefficient (per token, or per token and stream) come precomputed
    # (K + 1 or K + n values per token). LINK_RES: 0 no post_res term; 1 identity H_res (dx += g); 2 dx += H_res^T g.
    # LINK_PRE: dx += h_pre (x) dF_in.
    R: tl.constexpr = N_PAD * BLOCK_C
    pid_c, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = tl.arange(0, N_PAD)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mn, mc = offs_n < N, offs_c < C
    D = N * C
    offs_r = tl.reshape(offs_n[:, None] * C + offs_c[None, :], [R])  # rows (j, c) of v, phi and dphi
    mr = tl.reshape(mn[:, None] & mc[None, :], [R])
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < K
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, n_tokens)
    if ONE_K_TILE:  # phi's rows for this program, loaded once (K fits one tile)
        p_own = tl.load(phi_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    acc = tl.zeros([R, BLOCK_K], dtype=tl.float32)  # this split's v^T @ dproj tile
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mt = offs_t < t_end
        m_tr = mt[:, None] & mr[None, :]
        v = tl.load(v_ptr + offs_t[:, None] * D + offs_r[None, :], mask=m_tr, other=0.0).to(tl.float32)
        dp = tl.load(dproj_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        if WRITE_DPHI:
            acc = tl.dot(tl.trans(v), dp, acc, input_precision="tf32")
        if WRITE_DV and pid_k == 0:  # dx for these rows: dproj @ phi^T over all K tiles, the norm's term, the link's
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
            if PER_STREAM:
                s = tl.load(s_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0)
                dv += tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_T, N_PAD, BLOCK_C]), [BLOCK_T, R]) * v
            else:
                dv += tl.load(s_ptr + offs_t, mask=mt, other=0.0)[:, None] * v
            if LINK_RES == 1:
                dv += tl.load(g_ptr + offs_t[:, None] * D + offs_r[None, :], mask=m_tr, other=0.0).to(tl.float32)
            if LINK_RES == 2:  # H_res^T g, one output stream i at a time: the g tile is read once
                cols = tl.reshape(tl.broadcast_to(offs_c[None, :], [N_PAD, BLOCK_C]), [R])  # channel of each row
                js = tl.reshape(tl.broadcast_to(offs_n[:, None], [N_PAD, BLOCK_C]), [R])  # stream of each row
                for i in range(0, N):
                    gi = tl.load(g_ptr + offs_t[:, None] * D + i * C + cols[None, :], mask=m_tr, other=0.0)
                    hri = tl.load(hres_ptr + offs_t[:, None] * (N * N) + i * N + js[None, :], mask=m_tr, other=0.0)
                    dv += hri * gi.to(tl.float32)  # H_res[i, j] g[i, c] on row (j, c)
            if LINK_PRE:
                fg = tl.load(fg_ptr + offs_t[:, None] * C + offs_c[None, :], mask=mt[:, None] & mc[None, :], other=0.0)
                hp = tl.load(
                    hpre_ptr + offs_t[:, None] * N + offs_n[None, :], mask=mt[:, None] & mn[None, :], other=0.0
                )
                dv += tl.reshape(hp[:, :, None] * fg.to(tl.float32)[:, None, :], [BLOCK_T, R])
            tl.store(dv_ptr + offs_t[:, None] * D + offs_r[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m_tr)
    if WRITE_DPHI:
        dphi = dphi_ptr + pid_s.to(tl.int64) * D * K + offs_r[:, None] * K + offs_k[None, :]
        tl.store(dphi, acc, mask=mr[:, None] & mk[None, :])


def _fwd_configs(n: int, C: int, K: int, per_stream: bool) -> list[dict]:
    """Launch parameters (an autotune set on GPU, see `utils.launch_tuned`); tl.dot needs every tile side >= 16. The
    interpreter gets one small fixed config. The per-stream (HC) loop carries a second accumulator, so it takes half
    the tokens (the compile gate: 64 spilled at n >= 8). Second candidates: half the tokens at 4 warps; per stream,
    half the channel block (half the tokens at 4 warps spilled there)."""
    block_c = max(16, min(64, next_pow2(C)))
    block_k = min(32 if interpreting() else 128, max(16, next_pow2(K)))
    if interpreting():
        return [dict(BLOCK_T=16, BLOCK_C=min(block_c, 32), BLOCK_K=block_k, num_warps=4, num_stages=1)]
    if per_stream:
        return [
            dict(BLOCK_T=32, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=8, num_stages=3),
            dict(BLOCK_T=32, BLOCK_C=max(16, block_c // 2), BLOCK_K=block_k, num_warps=8, num_stages=3),
        ]
    return [
        dict(BLOCK_T=64, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=8, num_stages=3),
        dict(BLOCK_T=32, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=4, num_stages=3),
    ]


def _bwd_config(n: int, C: int, K: int) -> dict:
    """[16 tokens, n_pad * BLOCK_C = 128 rows, <= 32 coefficients] tiles at 8 warps (the compile gate: 4 warps
    reached 255 registers and spilled at n = 4 and 8)."""
    n_pad = next_pow2(n)
    block_k = min(32, max(16, next_pow2(K)))
    block_c = max(1, min(next_pow2(C), 128 // n_pad))
    if n_pad * block_c < 16:  # tl.dot's M side: at least 16 rows
        block_c = 16 // n_pad
    return dict(BLOCK_T=16, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=4 if interpreting() else 8, num_stages=1)


def projection_fwd(v: torch.Tensor, phi: torch.Tensor, eps: float, per_stream_k: int = 0):
    T, n, C = v.shape
    K = phi.shape[1]
    h = torch.empty(T, K, device=v.device, dtype=torch.float32)
    r = torch.empty((T, n) if per_stream_k else (T,), device=v.device, dtype=torch.float32)
    launch_tuned(
        _projection_fwd_kernel,
        lambda cfg: (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(K, cfg["BLOCK_K"])),
        _fwd_configs(n, C, K, bool(per_stream_k)),
        key=(next_pow2(T), n, C, K, v.dtype, per_stream_k),
        writes=("h_ptr", "r_ptr"),
        v_ptr=v,
        phi_ptr=phi,
        h_ptr=h,
        r_ptr=r,
        n_tokens=T,
        C=C,
        K=K,
        eps=eps,
        N=n,
        PER_STREAM=bool(per_stream_k),
    )
    return h, r


def _splits(T: int, c_blocks: int, k_tiles: int, block_t: int) -> int:
    """Token splits of the backward: enough programs to fill the GPU's resident slots once (2 per SM: the compile gate
    puts this kernel at 118-255 registers at 8 warps, so 1 or 2 programs fit an SM; more splits would only queue in
    waves and add dphi partials, 2 x splits x D x K x 4 bytes of traffic), at most 16, at least one block of tokens
    per split. The interpreter uses 2 (so the two-stage reduction is exercised on CPU)."""
    if interpreting():
        return max(1, min(2, triton.cdiv(T, block_t)))
    want = triton.cdiv(2 * sm_count(), c_blocks * k_tiles)
    return max(1, min(16, want, triton.cdiv(T, block_t)))


def _bwd_prep(gh, h, r, n: int, C: int, per_stream_k: int):
    """(dproj [T, K], s [T] or [T, n]): the per-token coefficients of the backward, one small launch."""
    T, K = gh.shape
    groups, k_s = (n, per_stream_k) if per_stream_k else (1, K)
    g_pad, ks_pad = next_pow2(groups), next_pow2(k_s)
    dproj, s = torch.empty_like(gh), torch.empty_like(r)
    bt = tokens_per_block(g_pad * ks_pad)
    launch(
        _projection_bwd_prep_kernel,
        (triton.cdiv(T, bt),),
        writes=("dproj_ptr", "s_ptr"),
        gh_ptr=gh,
        h_ptr=h,
        r_ptr=r,
        dproj_ptr=dproj,
        s_ptr=s,
        n_tokens=T,
        K=K,
        K_S=k_s,
        width=C if per_stream_k else n * C,
        GROUPS=groups,
        G_PAD=g_pad,
        KS_PAD=ks_pad,
        BLOCK_T=bt,
    )
    return dproj, s


def projection_bwd(
    v, phi, h, r, gh, per_stream_k=0, write_dv=True, g=None, h_res=None, f_grad=None, h_pre=None, write_dphi=True
):
    """(dv or None, dphi or None). With a link's tensors, dv also holds H_res^T g (g alone when h_res is None) and
    h_pre (x) f_grad. A split backward's input pass asks for no dphi, its weight pass for no dv."""
    T, n, C = v.shape
    K = phi.shape[1]
    dproj, s = _bwd_prep(gh, h, r, n, C, per_stream_k)
    cfg = _bwd_config(n, C, K)
    c_blocks, k_tiles = triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(K, cfg["BLOCK_K"])
    splits = _splits(T, c_blocks, k_tiles, cfg["BLOCK_T"])
    per_split = triton.cdiv(triton.cdiv(T, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    dv = torch.empty_like(v) if write_dv else None
    dphi = torch.empty(splits, n * C, K, device=v.device, dtype=torch.float32) if write_dphi else None
    link_res = 0 if g is None else (1 if h_res is None else 2)
    link_pre = f_grad is not None
    # phi's rows stay in registers when K fits one tile (the compile gate: a 16-wide tile kept there spilled 12 B on
    # sm_100 at n = 8 with identity H_res, so those reload it per token block, from L2)
    one_k_tile = k_tiles == 1 and cfg["BLOCK_K"] >= 32
    launch(
        _projection_bwd_kernel,
        (c_blocks, k_tiles, splits),
        writes=("dv_ptr", "dphi_ptr"),
        v_ptr=v,
        phi_ptr=phi,
        dproj_ptr=dproj,
        s_ptr=s,
        g_ptr=g if link_res else v,  # an unread placeholder when the term is off (LINK_* are compile-time)
        hres_ptr=h_res if link_res == 2 else s,
        fg_ptr=f_grad if link_pre else v,
        hpre_ptr=h_pre if link_pre else s,
        dv_ptr=dv if write_dv else v,
        dphi_ptr=dphi if write_dphi else v,
        n_tokens=T,
        tokens_per_split=per_split,
        C=C,
        K=K,
        N=n,
        N_PAD=next_pow2(n),
        PER_STREAM=bool(per_stream_k),
        WRITE_DV=write_dv,
        WRITE_DPHI=write_dphi,
        LINK_RES=link_res,
        LINK_PRE=link_pre,
        ONE_K_TILE=one_k_tile,
        **cfg,
    )
    if not write_dphi:
        return dv, None
    return dv, dphi.sum(0) if splits > 1 else dphi[0]


class ProjectionFunction(torch.autograd.Function):
    """Saves v (the input), r (1 or n per token) and h (K per token). With a link, its backward also adds the site's
    pre and post_res terms to dx (their backwards hand them over instead of writing a dx each).

    Split-backward schedules (ZBV, DualPipeV) run this backward twice: for input gradients, then again for weight
    gradients (torch.distributed.pipelining's stage_backward_weight re-runs the nodes next to the weights with their
    saved upstream gradients; pre and post_res do not run again). So the backward asks the engine which of its
    inputs *this* call needs (v and phi come in as views, each with a node of its own): dx, and the link's terms
    with it, only when v's gradient is wanted."""

    @staticmethod
    def forward(ctx, v, phi, eps, per_stream_k, link):
        h, r = projection_fwd(v, phi, eps, per_stream_k)
        ctx.per_stream_k, ctx.link = per_stream_k, link
        ctx.nodes = [t.grad_fn if t.requires_grad else None for t in (v, phi)]
        ctx.save_for_backward(v, phi, h, r)
        return h

    @staticmethod
    def backward(ctx, gh):
        v, phi, h, r = ctx.saved_tensors
        want_dv, want_dphi = (node is not None and torch._C._will_engine_execute_node(node) for node in ctx.nodes)
        g = h_res = f_grad = h_pre = None
        if ctx.link is not None and want_dv:
            g, h_res = ctx.link.take("post_res")
            f_grad, h_pre = ctx.link.take("pre")
            g = None if g is None else g.to(v.dtype).contiguous()
            f_grad = None if f_grad is None else f_grad.contiguous()
        elif ctx.link is not None:
            ctx.link.drop()
        if not (want_dv or want_dphi):
            return None, None, None, None, None
        dv, dphi = projection_bwd(
            v, phi, h, r, gh.contiguous().float(), ctx.per_stream_k, want_dv, g, h_res, f_grad, h_pre, want_dphi
        )
        return dv, dphi, None, None, None


def _own_node(t: torch.Tensor) -> torch.Tensor:
    """t as a view with a grad_fn of its own (when it requires grad): the backward can ask whether it is wanted."""
    return t.view_as(t) if t.requires_grad else t


def mhc_projection(
    x: torch.Tensor,
    phi: torch.Tensor,
    eps: float = 1e-6,
    link: SiteLink | None = None,
    per_stream: int = 0,
):
    """RMSNorm(vec(x)) @ phi with the reordered norm. x [..., n, C] (fp32/bf16/fp16), phi [nC, K] fp32 -> [..., K].

    The backward is always bit-reproducible (two-stage dphi reduction, no atomics).
    `link`: this op owns the site's single dx (see `mhc_kernels/link.py`); pass the same link to the site's mhc_pre
    and mhc_post_res. `per_stream=K_s` (HC): RMSNorm per stream and a block-diagonal phi [nC, n K_s], see the module
    docstring; h[..., j K_s + k] is stream j's column k. phi must be block-diagonal (`ops.hc_projection` builds it):
    the backward divides each column's terms by its own stream's norm, so off-diagonal blocks get wrong gradients.
    """
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    check_tensor("x", x, STREAM_DTYPES)
    check_tensor("phi", phi, (torch.float32,))
    if n > MAX_STREAMS:
        raise ValueError(f"n = {n} streams is above the Triton kernels' limit of {MAX_STREAMS}; use backend=torch")
    if phi.shape[0] != n * C:
        raise ValueError(f"phi must have n*C = {n * C} rows for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    if per_stream and phi.shape[1] != n * per_stream:
        raise ValueError(f"per_stream={per_stream}: phi must have n*{per_stream} columns, got {phi.shape[1]}")
    if link is not None:
        link.join("projection")
    h = ProjectionFunction.apply(_own_node(x.reshape(-1, n, C)), _own_node(phi), eps, per_stream, link)
    return h.reshape(*lead, phi.shape[1])
