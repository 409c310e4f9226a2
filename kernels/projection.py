"""Coefficient projection with the reordered RMSNorm (mHC paper kernel 1, Eqs. 14-16), forward and backward.

Forward, one pass over v = vec(x) (nC per token; streams fp32/bf16, phi and accumulation fp32):
    proj = v @ phi,  ss = sum(v^2),  r = sqrt(ss / D + eps),  h = proj / r          (D = nC, K = n^2 + 2n)
The matmul uses `tl.dot` in fp32 with IEEE precision (TF32 would perturb the coefficients; the interpreter also
needs fp32 operands). Saved for backward: r (1 per token) and h (K per token).

Backward, upstream gh [T, K]:
    dproj = gh / r;  dr = -sum_k(gh * h) / r;  dv = dproj @ phi^T + dr / r * v / D;  dphi = v^T @ dproj
One kernel computes dv and dphi from a single read of v:
- `deterministic=False` (default): each token block adds its v^T @ dproj to dphi with fp32 atomics (order varies
  run to run in the last bits);
- `deterministic=True`: each token block writes its partial to a [blocks, D, K] buffer summed in a fixed order
  afterwards: bit-reproducible, at the cost of blocks * D * K * 4 bytes of scratch and one extra pass over it.
Reference: `mhc_train/ops/reference.py::mhc_projection_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import STREAM_DTYPES, check_tensor, launch, next_pow2


@triton.jit(do_not_specialize=["n_tokens"])
def _projection_fwd_kernel(
    v_ptr, phi_ptr, h_ptr, r_ptr, n_tokens, D, K, eps, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    mt, mk = offs_t < n_tokens, offs_k < K
    acc = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
        v = v.to(tl.float32)
        p = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :], mask=md[:, None] & mk[None, :], other=0.0)
        acc += tl.dot(v, p, input_precision="ieee")
        ss += tl.sum(v * v, axis=1)
    r = tl.sqrt(ss / D + eps)
    tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], acc / r[:, None], mask=mt[:, None] & mk[None, :])
    tl.store(r_ptr + offs_t, r, mask=mt)


@triton.jit(do_not_specialize=["n_tokens"])
def _projection_bwd_kernel(
    v_ptr,
    phi_ptr,
    h_ptr,
    r_ptr,
    gh_ptr,
    dv_ptr,
    dphi_ptr,
    n_tokens,
    D,
    K,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    # DETERMINISTIC compiles the partial-buffer variant (dphi_ptr: [blocks, D, K]) instead of atomics into [D, K].
    pid = tl.program_id(0)
    offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    mt, mk = offs_t < n_tokens, offs_k < K
    m_tk = mt[:, None] & mk[None, :]
    gh = tl.load(gh_ptr + offs_t[:, None] * K + offs_k[None, :], mask=m_tk, other=0.0)
    h = tl.load(h_ptr + offs_t[:, None] * K + offs_k[None, :], mask=m_tk, other=0.0)
    r = tl.load(r_ptr + offs_t, mask=mt, other=1.0)
    dproj = gh / r[:, None]  # [T, K]
    coef = -tl.sum(gh * h, axis=1) / (r * r) / D  # dr / r / D, multiplies v
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        m_td = mt[:, None] & md[None, :]
        v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=m_td, other=0.0).to(tl.float32)
        p = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :], mask=md[:, None] & mk[None, :], other=0.0)
        dv = tl.dot(dproj, tl.trans(p), input_precision="ieee") + coef[:, None] * v
        tl.store(dv_ptr + offs_t[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=m_td)
        part = tl.dot(tl.trans(v), dproj, input_precision="ieee")  # [BLOCK_D, K_PAD]
        m_dk = md[:, None] & mk[None, :]
        if DETERMINISTIC:
            tl.store(dphi_ptr + pid.to(tl.int64) * D * K + offs_d[:, None] * K + offs_k[None, :], part, mask=m_dk)
        else:
            tl.atomic_add(dphi_ptr + offs_d[:, None] * K + offs_k[None, :], part, mask=m_dk)


BLOCK_T, BLOCK_D = 16, 64  # tl.dot needs every tile side >= 16


def projection_fwd(v: torch.Tensor, phi: torch.Tensor, eps: float):
    T, D = v.shape
    K = phi.shape[1]
    h = torch.empty(T, K, device=v.device, dtype=torch.float32)
    r = torch.empty(T, device=v.device, dtype=torch.float32)
    k_pad = max(16, next_pow2(K))
    launch(_projection_fwd_kernel, (triton.cdiv(T, BLOCK_T),), writes=("h_ptr", "r_ptr"), v_ptr=v, phi_ptr=phi,
           h_ptr=h, r_ptr=r, n_tokens=T, D=D, K=K, eps=eps, K_PAD=k_pad, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return h, r


def projection_bwd(v, phi, h, r, gh, deterministic: bool):
    T, D = v.shape
    K = phi.shape[1]
    k_pad = max(16, next_pow2(K))
    blocks = triton.cdiv(T, BLOCK_T)
    dv = torch.empty_like(v)
    if deterministic:
        dphi = torch.empty(blocks, D, K, device=v.device, dtype=torch.float32)
    else:
        dphi = torch.zeros(D, K, device=v.device, dtype=torch.float32)
    launch(_projection_bwd_kernel, (blocks,), writes=("dv_ptr", "dphi_ptr"), v_ptr=v, phi_ptr=phi, h_ptr=h, r_ptr=r,
           gh_ptr=gh, dv_ptr=dv, dphi_ptr=dphi, n_tokens=T, D=D, K=K, K_PAD=k_pad, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
           DETERMINISTIC=deterministic)
    return dv, (dphi.sum(0) if deterministic else dphi)


class ProjectionFunction(torch.autograd.Function):
    """Saves v (the input), r (1 per token) and h (K per token)."""

    @staticmethod
    def forward(ctx, v, phi, eps, deterministic):
        h, r = projection_fwd(v, phi, eps)
        ctx.deterministic = deterministic
        ctx.save_for_backward(v, phi, h, r)
        return h

    @staticmethod
    def backward(ctx, gh):
        v, phi, h, r = ctx.saved_tensors
        dv, dphi = projection_bwd(v, phi, h, r, gh.contiguous().float(), ctx.deterministic)
        return (dv if ctx.needs_input_grad[0] else None), (dphi if ctx.needs_input_grad[1] else None), None, None


def mhc_projection(x: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6, deterministic: bool = False):
    """RMSNorm(vec(x)) @ phi with the reordered norm. x [..., n, C] (fp32/bf16/fp16), phi [nC, K] fp32 -> [..., K]."""
    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    check_tensor("x", x, STREAM_DTYPES)
    check_tensor("phi", phi, (torch.float32,))
    if phi.shape[0] != n * C:
        raise ValueError(f"phi must have n*C = {n * C} rows for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    return ProjectionFunction.apply(x.reshape(-1, n * C), phi, eps, deterministic).reshape(*lead, phi.shape[1])
