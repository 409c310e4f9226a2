"""The connection math as plain functions: tensors in, tensors out; no modules, no configs.

This is the seam the Triton kernels of `mhc_kernels` plug into. Every function takes
`backend`, resolved here and only here:
- `torch`: the PyTorch path: the plain reference of `reference.py`, except Sinkhorn, which uses the hand-written,
  iterate-recomputing backward of `sinkhorn.py` (4x faster on CPU; tested against the reference);
- `triton`: the fused kernels (CUDA, or CPU through the interpreter when TRITON_INTERPRET=1 was set before
  `import triton`); inputs a kernel was not written for raise a ValueError that says why, never a silent fallback;
- `auto`: triton for CUDA tensors, torch otherwise.

- `sinkhorn_knopp(logits, iters=20)`: [..., n, n] -> doubly stochastic [..., n, n]
- `mhc_coefficients(x, phi, alpha, bias, iters=20, eps=1e-6)`: x [..., n, C] -> (h_pre, h_post, h_res)
- `mhc_pre(x, h_pre)`: [..., n, C] -> [..., C]
- `mhc_post_res(x, y, h_post, h_res)`: -> [..., n, C]; H_res left-multiplied, None = identity
- `hc_projection(x, weight, eps=1e-6)`: HC's dynamic projection, RMSNorm per stream then @ weight: [..., n, C] ->
  [..., n, K_s] (weight [C, K_s], the norm gain folded in)
- `hc_gates(h, static, scale)`: HC's coefficients from it: tanh(h) * scale + static -> (h_pre, h_post, h_res)

One dx per site (`chain=True` on `mhc_coefficients` / `hc_projection`): each also returns a `link` (a
`mhc_kernels.SiteLink`, or None on the torch path), to pass to the site's `mhc_pre` and `mhc_post_res`. Their
backwards then write no dx: they hand their terms to the projection's backward kernel, which writes x's one
gradient (`dx = proj term + h_pre (x) dF_in + H_res^T g`) instead of three that autograd adds: three passes over
[T, n, C] fewer in the backward. See `mhc_kernels/link.py`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from mhc_train.config import BACKENDS, SINKHORN_BACKWARDS

from .reference import (
    coefficient_dtype,
    hc_gates_ref,
    hc_projection_ref,
    mhc_coefficients_ref,
    mhc_post_res_ref,
    mhc_pre_ref,
    mhc_projection_ref,
    sinkhorn_knopp_ref,
)
from .sinkhorn import sinkhorn_knopp_implicit, sinkhorn_knopp_torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend that runs for tensors on `device`: `auto` is triton on CUDA (when importable), torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"connection.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("connection.backend=triton but triton is not installed; pip install triton or use torch")
    return backend


def _kernels():
    import mhc_kernels

    return mhc_kernels


_noticed: set = set()


def _kernel_takes(op: str, n: int) -> bool:
    """Whether the Triton kernels handle n streams; above their limit the torch path runs, with a one-time notice."""
    limit = _kernels().MAX_STREAMS
    if n <= limit:
        return True
    if (op, n) not in _noticed:
        _noticed.add((op, n))
        warnings.warn(
            f"{op}: n = {n} streams is above the Triton kernels' limit of {limit}; running the torch path for it "
            "(set connection.backend=torch to silence this)",
            stacklevel=3,
        )
    return False


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20, backend: str = "torch", implicit: bool = False):
    """`implicit=True`: backward by implicit differentiation of the fixed point (torch, any backend)."""
    if implicit:
        return sinkhorn_knopp_implicit(logits, iters)
    if resolve_backend(backend, logits.device) == "triton" and _kernel_takes("sinkhorn_knopp", logits.shape[-1]):
        return _kernels().sinkhorn_knopp(logits.float().contiguous(), iters)
    return sinkhorn_knopp_torch(logits, iters)


def coefficient_region(x: torch.Tensor):
    """Autocast off for the coefficient path (projection, gates, Sinkhorn): it runs in fp32 whatever precision the
    engine runs the rest in (the mHC paper keeps it fp32; a bf16 projection of the nC stream loses the small
    coefficient differences the gates learn)."""
    if x.device.type == "meta":  # launches recorded on meta tensors (mhc_train.ops.audit): no autocast there
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def mhc_coefficients(
    x,
    phi,
    alpha,
    bias,
    iters: int = 20,
    eps: float = 1e-6,
    backend: str = "torch",
    deterministic: bool = False,
    sinkhorn_backward: str = "unrolled",
    chain: bool = False,
):
    if sinkhorn_backward not in SINKHORN_BACKWARDS:
        raise ValueError(f"connection.sinkhorn_backward must be one of {SINKHORN_BACKWARDS}, got {sinkhorn_backward!r}")
    link = _new_link(backend, x) if chain else None
    with coefficient_region(x):
        out = _mhc_coefficients(x, phi, alpha, bias, iters, eps, backend, deterministic, sinkhorn_backward, link)
    return (*out, link) if chain else out  # chain: (h_pre, h_post, h_res, link), see the module docstring


def _new_link(backend: str, x: torch.Tensor):
    """A SiteLink when the site's ops run on the kernels, else None (the torch path: autograd sums dx)."""
    if resolve_backend(backend, x.device) == "triton" and x.shape[-2] <= _kernels().MAX_STREAMS:
        return _kernels().SiteLink()
    return None


def _mhc_coefficients(x, phi, alpha, bias, iters, eps, backend, deterministic, sinkhorn_backward, link):
    implicit = sinkhorn_backward == "implicit"
    sinkhorn = sinkhorn_knopp_implicit if implicit else sinkhorn_knopp_torch
    if resolve_backend(backend, x.device) != "triton" or not _kernel_takes("mhc_coefficients", x.shape[-2]):
        return mhc_coefficients_ref(x, phi, alpha, bias, iters, eps, sinkhorn=sinkhorn)
    k = _kernels()
    if implicit:  # kernel 1, then the torch tail with the implicit Sinkhorn backward
        return mhc_coefficients_ref(
            x,
            phi,
            alpha,
            bias,
            iters,
            eps,
            sinkhorn=sinkhorn,
            projection=lambda v, p, e: k.mhc_projection(v.contiguous(), p, e, deterministic, link=link),
        )
    h = k.mhc_projection(x.contiguous(), phi, eps, deterministic, link=link)  # kernel 1: [..., K] fp32
    return k.mhc_gates_sinkhorn(h, alpha.float().contiguous(), bias.float().contiguous(), x.shape[-2], iters)


def hc_projection(x, weight, eps: float = 1e-6, backend: str = "torch", chain: bool = False):
    """HC's dynamic projection: each stream RMS-normalised on its own, then @ weight [C, K_s] (gain folded in):
    x [..., n, C] -> [..., n, K_s] fp32. The kernel runs it as one pass over x with a block-diagonal weight."""
    n = x.shape[-2]
    link = _new_link(backend, x) if chain else None
    with coefficient_region(x):
        if resolve_backend(backend, x.device) == "triton" and _kernel_takes("hc_projection", n):
            k_s = weight.shape[-1]
            block = torch.block_diag(*[weight.float()] * n)  # [nC, n K_s]: stream j's weight in block j
            h = _kernels().mhc_projection(x.contiguous(), block, eps, link=link, per_stream=k_s)
            h = h.unflatten(-1, (n, k_s))
        else:
            h = hc_projection_ref(x, weight, eps)
    return (h, link) if chain else h


def hc_gates(h, static, scale, backend: str = "torch"):
    """HC's dynamic coefficients from `hc_projection`'s output (see `hc_gates_ref`); one kernel each way on triton."""
    with coefficient_region(h):
        if resolve_backend(backend, h.device) == "triton" and _kernel_takes("hc_gates", h.shape[-2]):
            return _kernels().hc_gates(h.contiguous(), static.float().contiguous(), scale.float().contiguous())
        return hc_gates_ref(h, static, scale)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor, backend: str = "torch", link=None) -> torch.Tensor:
    """`link`: the site's link from `mhc_coefficients(..., chain=True)` (see the module docstring)."""
    if resolve_backend(backend, x.device) == "triton" and _kernel_takes("mhc_pre", x.shape[-2]):
        return _kernels().mhc_pre(x.contiguous(), h_pre.float().contiguous(), link=link)
    with coefficient_region(x):  # the stream math in fp32 as in the kernels (autocast would run these @ in bf16)
        return mhc_pre_ref(x, h_pre)


def mhc_post_res(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor | None,
    backend: str = "torch",
    link=None,
) -> torch.Tensor:
    if resolve_backend(backend, x.device) == "triton" and _kernel_takes("mhc_post_res", x.shape[-2]):
        h_res = None if h_res is None else h_res.float().contiguous()
        return _kernels().mhc_post_res(x.contiguous(), y.contiguous(), h_post.float().contiguous(), h_res, link=link)
    with coefficient_region(x):
        return mhc_post_res_ref(x, y, h_post, h_res)


sinkhorn_knopp.__doc__ = sinkhorn_knopp_ref.__doc__
mhc_coefficients.__doc__ = mhc_coefficients_ref.__doc__
mhc_pre.__doc__ = f"{mhc_pre_ref.__doc__}\n\n{mhc_pre.__doc__}"
mhc_post_res.__doc__ = mhc_post_res_ref.__doc__

__all__ = [
    "BACKENDS",
    "coefficient_region",
    "coefficient_dtype",
    "hc_gates",
    "hc_gates_ref",
    "hc_projection",
    "hc_projection_ref",
    "mhc_coefficients",
    "mhc_post_res",
    "mhc_pre",
    "mhc_projection_ref",
    "resolve_backend",
    "sinkhorn_knopp",
    "sinkhorn_knopp_ref",
    "SINKHORN_BACKWARDS",
]
