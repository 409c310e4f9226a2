"""Coefficient projection with the reordered RMSNorm (mHC paper kernel 1, Eqs. 14-16), forward and backward.

Forward, one pass over v = vec(x) (nC per token; streams fp32/bf16/fp16, phi and accumulation fp32):
    proj = v @ phi,  ss = sum(v^2),  r = sqrt(ss / D + eps),  h = proj / r          (D = nC, K = n^2 + 2n)
Grid [token blocks, K tiles]: K is tiled (BLOCK_K <= 128), so n = 16 (K = 288) needs no 512-wide tile; each K tile
re-reads its token block of v (once per tile: 1 read at n <= 8 with the GPU config, 3 at n = 16).
The matmuls run on tensor cores: `tl.dot(..., input_precision="tf32")` on fp32 operands (bf16/fp16 streams are
widened exactly), fp32 accumulation. TF32 keeps 10 mantissa bits per operand, so each product carries a relative
error of at most ~2^-10: |h - h_exact| <= 2^-10 * (|v| @ |phi|) / r plus fp32 accumulation (tested against fp64 with
that bound in tests/kernels/test_kernels.py). The interpreter computes the dots in exact fp32.
Saved for backward: r (1 per token) and h (K per token).

Backward, upstream gh [T, K]:
    dproj = gh / r;  dr = -sum_k(gh * h) / r;  dv = dproj @ phi^T + dr / r * v / D;  dphi = v^T @ dproj
One kernel, grid [D blocks, K tiles, token splits]. A program owns a [BLOCK_D, BLOCK_K] tile of dphi and walks the
tokens of its split, accumulating v^T @ dproj in registers; the K-tile-0 program of each D block also writes dv for
those columns (looping over all K tiles of phi). dphi is a two-stage reduction: each split writes its partial to a
[splits, D, K] buffer, summed in a fixed order afterwards. No atomics, so dphi is bit-reproducible whatever
`deterministic` says, and the scratch is splits * D * K * 4 bytes (splits <= 16, chosen to fill the GPU).
Reference: `mhc_train/ops/reference.py::mhc_projection_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import STREAM_DTYPES, check_tensor, interpreting, launch, next_pow2, sm_count


@triton.jit(do_not_specialize=["n_tokens"])
def _projection_fwd_kernel(
    v_ptr,
    phi_ptr,
    h_ptr,
    r_ptr,
    n_tokens,
    D,
    K,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mt, mk = offs_t < n_tokens, offs_k < K
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        v = v.to(tl.float32)
        p = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :], mask=md[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(v, p, acc, input_precision="tf32")
        ss += tl.sum(v * v, axis=1)
    r = tl.sqrt(ss / D + eps)
    tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], acc / r[:, None], mask=mt[:, None] & mk[None, :])
    if pid_k == 0:
        tl.store(r_ptr + offs_t, r, mask=mt)


@triton.jit(do_not_specialize=["n_tokens", "tokens_per_split"])
def _projection_bwd_kernel(
    v_ptr,
    phi_ptr,
    h_ptr,
    r_ptr,
    gh_ptr,
    dvin_ptr,
    dv_ptr,
    dphi_ptr,
    n_tokens,
    tokens_per_split,
    D,
    K,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_DV: tl.constexpr,
):
    # ACC_DV: dv also adds dvin, the gradient of the chained stream alias (mhc_projection(..., chain=True)): the
    # site's other dx contributions, summed here instead of by autograd.
    pid_d, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    md, mk = offs_d < D, offs_k < K
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, n_tokens)
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)  # this split's v^T @ dproj tile
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mt = offs_t < t_end
        m_td = mt[:, None] & md[None, :]
        v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs_t, mask=mt, other=1.0)
        gh = tl.load(gh_ptr + offs_t[:, None] * K + offs_k[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(tl.trans(v), gh / r[:, None], acc, input_precision="tf32")
        if pid_k == 0:  # dv for these columns: all K tiles of dproj @ phi^T, plus the norm's term
            dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            ghh = tl.zeros([BLOCK_T], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_j = k0 + tl.arange(0, BLOCK_K)
                m_tj = mt[:, None] & (offs_j < K)[None, :]
                gj = tl.load(gh_ptr + offs_t[:, None] * K + offs_j[None, :], mask=m_tj, other=0.0)
                hj = tl.load(h_ptr + offs_t[:, None] * K + offs_j[None, :], mask=m_tj, other=0.0)
                pj = tl.load(
                    phi_ptr + offs_d[:, None] * K + offs_j[None, :], mask=md[:, None] & (offs_j < K)[None, :], other=0.0
                )
                ghh += tl.sum(gj * hj, axis=1)
                dv = tl.dot(gj / r[:, None], tl.trans(pj), dv, input_precision="tf32")
            dv += (-ghh / (r * r) / D)[:, None] * v
            if ACC_DV:
                dv += tl.load(dvin_ptr + offs_t[:, None] * D + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
            tl.store(dv_ptr + offs_t[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m_td)
    dphi = dphi_ptr + pid_s.to(tl.int64) * D * K + offs_d[:, None] * K + offs_k[None, :]
    tl.store(dphi, acc, mask=md[:, None] & mk[None, :])


def _fwd_config(K: int) -> dict:
    """Launch parameters; tl.dot needs every tile side >= 16. The interpreter gets a small fixed config."""
    block_k = min(32 if interpreting() else 128, max(16, next_pow2(K)))
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_D=32, BLOCK_K=block_k, num_warps=4, num_stages=1)
    return dict(BLOCK_T=64, BLOCK_D=64, BLOCK_K=block_k, num_warps=8, num_stages=3)


def _bwd_config(K: int) -> dict:
    """[16 tokens, 32 columns, <= 32 coefficients] tiles at 4 warps (the compile gate: 64-wide D tiles reached 255
    registers and spilled on sm_100; 32 tokens reached 237 registers and spilled once with an unaligned C)."""
    block_k = min(32, max(16, next_pow2(K)))
    if interpreting():
        return dict(BLOCK_T=16, BLOCK_D=32, BLOCK_K=block_k, num_warps=4, num_stages=1)
    return dict(BLOCK_T=16, BLOCK_D=32, BLOCK_K=block_k, num_warps=4, num_stages=1)


def projection_fwd(v: torch.Tensor, phi: torch.Tensor, eps: float):
    T, D = v.shape
    K = phi.shape[1]
    h = torch.empty(T, K, device=v.device, dtype=torch.float32)
    r = torch.empty(T, device=v.device, dtype=torch.float32)
    cfg = _fwd_config(K)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(K, cfg["BLOCK_K"]))
    launch(
        _projection_fwd_kernel,
        grid,
        writes=("h_ptr", "r_ptr"),
        v_ptr=v,
        phi_ptr=phi,
        h_ptr=h,
        r_ptr=r,
        n_tokens=T,
        D=D,
        K=K,
        eps=eps,
        **cfg,
    )
    return h, r


def _splits(T: int, d_blocks: int, k_tiles: int, block_t: int) -> int:
    """Token splits of the backward: enough programs for ~4 per SM, at most 16 partials of dphi, at least one block of
    tokens per split. The interpreter uses 2 (so the two-stage reduction is exercised on CPU)."""
    if interpreting():
        return max(1, min(2, triton.cdiv(T, block_t)))
    want = triton.cdiv(4 * sm_count(), d_blocks * k_tiles)
    return max(1, min(16, want, triton.cdiv(T, block_t)))


def projection_bwd(v, phi, h, r, gh, dv_in=None):
    T, D = v.shape
    K = phi.shape[1]
    cfg = _bwd_config(K)
    d_blocks, k_tiles = triton.cdiv(D, cfg["BLOCK_D"]), triton.cdiv(K, cfg["BLOCK_K"])
    splits = _splits(T, d_blocks, k_tiles, cfg["BLOCK_T"])
    per_split = triton.cdiv(triton.cdiv(T, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    dv = torch.empty_like(v)
    dphi = torch.empty(splits, D, K, device=v.device, dtype=torch.float32)
    launch(
        _projection_bwd_kernel,
        (d_blocks, k_tiles, splits),
        writes=("dv_ptr", "dphi_ptr"),
        v_ptr=v,
        phi_ptr=phi,
        h_ptr=h,
        r_ptr=r,
        gh_ptr=gh,
        dvin_ptr=dv if dv_in is None else dv_in,
        ACC_DV=dv_in is not None,
        dv_ptr=dv,
        dphi_ptr=dphi,
        n_tokens=T,
        tokens_per_split=per_split,
        D=D,
        K=K,
        **cfg,
    )
    return dv, dphi.sum(0) if splits > 1 else dphi[0]


class ProjectionFunction(torch.autograd.Function):
    """Saves v (the input), r (1 per token) and h (K per token). Returns (h, v): the second output is v itself, for
    the site's stream ops downstream, so that their dx comes back here and is added by the backward kernel."""

    @staticmethod
    def forward(ctx, v, phi, eps):
        ctx.set_materialize_grads(False)  # an unused v alias gives None, not a zero tensor to read
        h, r = projection_fwd(v, phi, eps)
        ctx.save_for_backward(v, phi, h, r)
        return h, v

    @staticmethod
    def backward(ctx, gh, g_v):
        v, phi, h, r = ctx.saved_tensors
        dv_in = None if g_v is None else g_v.to(v.dtype).contiguous()
        gh = torch.zeros_like(h) if gh is None else gh.contiguous().float()
        dv, dphi = projection_bwd(v, phi, h, r, gh, dv_in)
        return (dv if ctx.needs_input_grad[0] else None), (dphi if ctx.needs_input_grad[1] else None), None


def mhc_projection(
    x: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6, deterministic: bool = True, chain: bool = False
):
    """RMSNorm(vec(x)) @ phi with the reordered norm. x [..., n, C] (fp32/bf16/fp16), phi [nC, K] fp32 -> [..., K].

    `deterministic` is accepted for the ops API: the backward is always bit-reproducible (two-stage dphi reduction).
    `chain=True` returns (h, x_chained): x_chained equals x; the site's stream ops use it in place of x and their
    dx is added inside this op's backward kernel (the site writes one dx).
    """
    del deterministic
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    check_tensor("x", x, STREAM_DTYPES)
    check_tensor("phi", phi, (torch.float32,))
    if phi.shape[0] != n * C:
        raise ValueError(f"phi must have n*C = {n * C} rows for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    h, v = ProjectionFunction.apply(x.reshape(-1, n * C), phi, eps)
    h = h.reshape(*lead, phi.shape[1])
    return (h, v.reshape(x.shape)) if chain else h
