"""The connection math as plain functions and as one site step: tensors in, tensors out; no modules, no configs.

This is the seam the Triton kernels of `mhc_kernels` plug into, in two levels:
- kernel-level ops, one per kernel, each a method of a backend object (`backends.py`: `torch`, `triton`; `auto` is
  triton for CUDA tensors, torch elsewhere), with the site's one-dx chaining explicit in the signature (`link`);
- the connection's step (`step.py`, `SiteStep`): a whole site, coefficients -> pre -> sub-layer -> post_res, on a
  backend resolved once per model and device. It owns the chaining, the fp32 coefficient region and nothing else;
  model sites, selective recomputation, decode (a backend of its own) and the traffic audit all run it.

The plain functions below are the kernel-level ops for standalone use (tests, benchmarks); `backend` is a name
(resolved per call) or a backend object:
- `sinkhorn_knopp(logits, iters=20)`: [..., n, n] -> doubly stochastic [..., n, n]
- `mhc_coefficients(x, phi, alpha, bias, iters=20, eps=1e-6)`: x [..., n, C] -> (h_pre, h_post, h_res)
- `mhc_pre(x, h_pre)`: [..., n, C] -> [..., C]
- `mhc_post_res(x, y, h_post, h_res)`: -> [..., n, C]; H_res left-multiplied, None = identity
- `hc_projection(x, weight, eps=1e-6)`: HC's dynamic projection, RMSNorm per stream then @ weight: [..., n, C] ->
  [..., n, K_s] (weight [C, K_s], the norm gain folded in)
- `mhc_coefficients_deepseek_ref`, `sinkhorn_deepseek_ref`, `collapse_learned_ref` (`deepseek.py`): DeepSeek-V4's
  arithmetic (`connection.numerics: deepseek_v4`) and learned collapse, in this project's frame
- `hc_gates(h, static, scale)`: HC's coefficients from it: tanh(h) * scale + static -> (h_pre, h_post, h_res)

One dx per site (`link`, a `library.Link` of slot tensors, None on the torch path): a site's linked projection returns
it and its `mhc_pre` and `mhc_post_res` take it. Their backwards then write no dx: they return their terms as the
slots' gradients to the projection's backward kernel, which writes x's one gradient
(`dx = proj term + h_pre (x) dF_in + H_res^T g`) instead of three that autograd adds: three passes over [T, n, C]
fewer in the backward. See `library.py`. `SiteStep` does this for every site. The kernels are `torch.library` ops in
the `mhc_train` namespace (`library.py`, `library_gates.py`), so torch.compile traces a site without a graph break.
"""

from __future__ import annotations

import torch

from mhc_train.config import BACKENDS, SINKHORN_BACKWARDS

from .backends import TorchBackend, TritonBackend, coefficient_region, resolve, resolve_backend, triton_available
from .deepseek import (
    collapse_learned_ref,
    mhc_coefficients_deepseek_ref,
    mhc_projection_deepseek_ref,
    sinkhorn_deepseek_ref,
)
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
from .step import SiteKernels, SiteRead, SiteStep

Backend = str | TorchBackend


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20, backend: Backend = "torch", implicit: bool = False):
    """`implicit=True`: backward by implicit differentiation of the fixed point (torch, any backend)."""
    return resolve(backend, logits.device).sinkhorn(logits, iters, implicit)


def mhc_coefficients(
    x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6, backend: Backend = "torch", sinkhorn_backward="unrolled"
):  # fmt: skip
    if sinkhorn_backward not in SINKHORN_BACKWARDS:
        raise ValueError(f"connection.sinkhorn_backward must be one of {SINKHORN_BACKWARDS}, got {sinkhorn_backward!r}")
    with coefficient_region(x):
        implicit = sinkhorn_backward == "implicit"
        return resolve(backend, x.device).mhc_coefficients(x, phi, alpha, bias, iters, eps, implicit)[0]


def hc_projection(x, weight, eps: float = 1e-6, backend: Backend = "torch"):
    """HC's dynamic projection: each stream RMS-normalised on its own, then @ weight [C, K_s] (gain folded in):
    x [..., n, C] -> [..., n, K_s] fp32. The kernel runs it as one pass over x with a block-diagonal weight."""
    with coefficient_region(x):
        return resolve(backend, x.device).hc_projection(x, weight, eps)[0]


def hc_gates(h, static, scale, backend: Backend = "torch"):
    """HC's dynamic coefficients from `hc_projection`'s output (see `hc_gates_ref`); one kernel each way on triton."""
    with coefficient_region(h):
        return resolve(backend, h.device).hc_gates(h, static, scale)


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor, backend: Backend = "torch", link=None) -> torch.Tensor:
    """`link`: the site's link (see the module docstring; made by `SiteStep`)."""
    return resolve(backend, x.device).pre(x, h_pre, link)


def mhc_post_res(x, y, h_post, h_res, backend: Backend = "torch", link=None) -> torch.Tensor:
    return resolve(backend, x.device).post_res(x, y, h_post, h_res, link)


sinkhorn_knopp.__doc__ = f"{sinkhorn_knopp_ref.__doc__}\n\n{sinkhorn_knopp.__doc__}"
mhc_coefficients.__doc__ = mhc_coefficients_ref.__doc__
mhc_pre.__doc__ = f"{mhc_pre_ref.__doc__}\n\n{mhc_pre.__doc__}"
mhc_post_res.__doc__ = mhc_post_res_ref.__doc__

__all__ = [
    "BACKENDS",
    "SINKHORN_BACKWARDS",
    "SiteKernels",
    "SiteRead",
    "SiteStep",
    "TorchBackend",
    "TritonBackend",
    "coefficient_dtype",
    "collapse_learned_ref",
    "mhc_coefficients_deepseek_ref",
    "mhc_projection_deepseek_ref",
    "sinkhorn_deepseek_ref",
    "coefficient_region",
    "hc_gates",
    "hc_gates_ref",
    "hc_projection",
    "hc_projection_ref",
    "mhc_coefficients",
    "mhc_post_res",
    "mhc_pre",
    "mhc_projection_ref",
    "resolve",
    "resolve_backend",
    "sinkhorn_knopp",
    "sinkhorn_knopp_ref",
    "triton_available",
]
