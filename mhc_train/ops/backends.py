"""The kernel-level ops of each backend: one object per backend, resolved from `connection.backend` once.

Axis legend: `...` leading token axes, n streams, C channels, K coefficient columns.

A backend has one method per kernel (`mhc_coefficients`, `hc_projection`, `hc_gates`, `pre`, `post_res`,
`sinkhorn`), with the site's one-dx chaining explicit in the signatures, tensors only: a projection op called with
`linked=True` returns `(result, link)`, the link being the slot tensors of `library.Link` (None on the torch path and
in the n > 16 fallback, where autograd sums x's gradients), and `pre` / `post_res` take it.

Notable choices:
- `torch`: the plain reference of `reference.py`, except Sinkhorn, which uses the iterate-recomputing backward of
  `sinkhorn.py` (4x faster on CPU; tested against the reference). The stream math runs inside `coefficient_region`
  (fp32 under autocast, like the kernels).
- `triton`: the fused kernels as `torch.library` custom ops (`library.py`, `library_gates.py`), on CUDA, or on CPU
  through the interpreter when TRITON_INTERPRET=1 was set before `import triton`. Above the kernels' stream limit (n >
  16) an op runs the torch backend's, with a one-time notice: the one fallback there is, chosen by the op from n only.
  Inputs a kernel was not written for raise a ValueError.
- `resolve(name, device)` is the only place a backend name is read and validated; `auto` is triton for CUDA tensors
  (when importable), torch elsewhere. The implicit Sinkhorn backward is torch on every backend.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from mhc_train.config import BACKENDS

from . import library, library_gates  # (register the mhc_train:: ops; import triton lazily)
from .deepseek import mhc_coefficients_deepseek_ref
from .reference import hc_gates_ref, hc_projection_ref, mhc_coefficients_ref, mhc_post_res_ref, mhc_pre_ref
from .sinkhorn import sinkhorn_knopp_implicit, sinkhorn_knopp_torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend name that runs for tensors on `device`: `auto` is triton on CUDA (when importable), torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"connection.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("connection.backend=triton but triton is not installed; pip install triton or use torch")
    return backend


def coefficient_region(x: torch.Tensor):
    """Autocast off for the coefficient path (projection, gates, Sinkhorn): it runs in fp32 whatever precision the
    engine runs the rest in (the mHC paper keeps it fp32; a bf16 projection of the nC stream loses the small
    coefficient differences the gates learn)."""
    if x.device.type == "meta":  # launches recorded on meta tensors (mhc_train.ops.audit): no autocast there
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


class TorchBackend:
    """The PyTorch path. It makes no link (autograd sums x's gradients): the projection ops return (result, None)."""

    name = "torch"

    def coefficient_region(self, x: torch.Tensor):
        return coefficient_region(x)

    def sinkhorn(self, logits: torch.Tensor, iters: int, implicit: bool = False) -> torch.Tensor:
        return (sinkhorn_knopp_implicit if implicit else sinkhorn_knopp_torch)(logits, iters)

    def mhc_coefficients(self, x, phi, alpha, bias, iters: int, eps: float, implicit: bool = False, linked=False):
        """((h_pre, h_post, h_res | None), the site's link or None)."""
        sinkhorn = sinkhorn_knopp_implicit if implicit else sinkhorn_knopp_torch
        return mhc_coefficients_ref(x, phi, alpha, bias, iters, eps, sinkhorn=sinkhorn), None

    def mhc_coefficients_deepseek(self, x, phi, alpha, bias, iters: int, eps: float, hc_eps: float, linked=False):
        """DeepSeek-V4 numerics (`deepseek.py`): ((h_pre, h_post, h_res), the site's link or None)."""
        return mhc_coefficients_deepseek_ref(x, phi, alpha, bias, iters, eps, hc_eps), None

    def hc_projection(self, x, weight, eps: float, linked=False):
        """(h [..., n, K_s], the site's link or None)."""
        return hc_projection_ref(x, weight, eps), None

    def hc_gates(self, h, static, scale):
        return hc_gates_ref(h, static, scale)

    def pre(self, x, h_pre, link=None):
        with coefficient_region(x):  # the stream math in fp32 as in the kernels (autocast would run these @ in bf16)
            return mhc_pre_ref(x, h_pre)

    def post_res(self, x, y, h_post, h_res, link=None):
        with coefficient_region(x):
            return mhc_post_res_ref(x, y, h_post, h_res)


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
            stacklevel=4,
        )
    return False


class TritonBackend(TorchBackend):
    """The fused kernels as the `torch.library` ops of `library.py`; each op falls back to the torch backend's above
    n = 16 (see the module). A linked projection returns the site's `library.Link` slots for its pre and post_res."""

    name = "triton"

    def sinkhorn(self, logits, iters, implicit=False):
        if implicit or not _kernel_takes("sinkhorn_knopp", logits.shape[-1]):
            return super().sinkhorn(logits, iters, implicit)
        return library_gates.sinkhorn_knopp(logits.float().contiguous(), iters)

    def mhc_coefficients(self, x, phi, alpha, bias, iters, eps, implicit=False, linked=False):
        if not _kernel_takes("mhc_coefficients", x.shape[-2]):
            return super().mhc_coefficients(x, phi, alpha, bias, iters, eps, implicit)
        h, link = library.mhc_projection(x.contiguous(), phi, eps, linked=linked)  # kernel 1: [..., K] fp32
        if implicit:  # the torch tail with the implicit Sinkhorn backward
            coefficients = mhc_coefficients_ref(
                x, phi, alpha, bias, iters, eps, sinkhorn_knopp_implicit, lambda v, p, e: h
            )
            return coefficients, link
        alpha, bias = alpha.float().contiguous(), bias.float().contiguous()
        return library_gates.mhc_gates_sinkhorn(h, alpha, bias, x.shape[-2], iters), link

    def mhc_coefficients_deepseek(self, x, phi, alpha, bias, iters, eps, hc_eps, linked=False):
        """The projection kernel (reordered norm, linked as the paper's path) and DeepSeek's tail in torch."""
        if not _kernel_takes("mhc_coefficients", x.shape[-2]):
            return super().mhc_coefficients_deepseek(x, phi, alpha, bias, iters, eps, hc_eps)
        h, link = library.mhc_projection(x.contiguous(), phi, eps, linked=linked)  # kernel 1: [..., K] fp32
        project = lambda v, p, e: h  # noqa: E731
        return mhc_coefficients_deepseek_ref(x, phi, alpha, bias, iters, eps, hc_eps, projection=project), link

    def hc_projection(self, x, weight, eps, linked=False):
        n = x.shape[-2]
        if not _kernel_takes("hc_projection", n):
            return super().hc_projection(x, weight, eps)
        k_s = weight.shape[-1]
        block = torch.block_diag(*[weight.float()] * n)  # [nC, n K_s]: stream j's weight in block j
        h, link = library.mhc_projection(x.contiguous(), block, eps, per_stream=k_s, linked=linked)
        return h.unflatten(-1, (n, k_s)), link

    def hc_gates(self, h, static, scale):
        if not _kernel_takes("hc_gates", h.shape[-2]):
            return super().hc_gates(h, static, scale)
        return library_gates.hc_coefficients(h.contiguous(), static.float().contiguous(), scale.float().contiguous())

    def pre(self, x, h_pre, link=None):
        if not _kernel_takes("mhc_pre", x.shape[-2]):
            return super().pre(x, h_pre)
        return library.mhc_pre(x.contiguous(), h_pre.float().contiguous(), link)

    def post_res(self, x, y, h_post, h_res, link=None):
        if not _kernel_takes("mhc_post_res", x.shape[-2]):
            return super().post_res(x, y, h_post, h_res)
        h_res = None if h_res is None else h_res.float().contiguous()
        return library.mhc_post_res(x.contiguous(), y.contiguous(), h_post.float().contiguous(), h_res, link)


BACKEND_OBJECTS = {"torch": TorchBackend(), "triton": TritonBackend()}


def resolve(backend: str | TorchBackend, device: torch.device | str = "cpu") -> TorchBackend:
    """The backend object for `device` (a backend object passes through)."""
    if isinstance(backend, TorchBackend):
        return backend
    return BACKEND_OBJECTS[resolve_backend(backend, device)]
