"""The connection's step: one whole site, coefficients -> pre -> sub-layer -> post_res, on a backend resolved once.

Axis legend: B batch, T time, n streams, C channels.

    step = SiteStep("auto")                           # once per model (the connection builds it for every site)
    out, state = step(coefficients, x, sublayer)      # x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

`coefficients(x, kernels) -> (h_pre, h_post, h_res | None)` is the arm's coefficient math (a site's method), written
against `kernels`, a `SiteKernels`: the backend's ops bound to this call's `SiteLink`. Sites never see the link.

Notable choices:
- The backend name is resolved once per step and device (`backend(device)`, cached): a model built on the meta device
  resolves on first use where it was materialised, and every later call reads the cache.
- The step owns the one-dx chaining: the first projection of a call returns the site's link (`SiteKernels`; slot
  tensors, `library.Link`), and the site's pre and post_res take it, so the projection's backward writes x's one
  gradient (`library.py`). Only tensors cross an op: a compiled block has no graph break at a site.
  Under no_grad there is no link (nothing to hand over; a link changes no forward): a no-grad read can be written
  more than once (selective recomputation's replays).
- The step owns the fp32 coefficient region: `coefficients` runs with autocast off (`backends.coefficient_region`).
- Two halves, `read` (coefficients, pre) and `write` (post_res), for the callers that run F apart from the site:
  selective recomputation replays them without F; DualPipeV routes `write` through its priority-stream runner.
- `state` is passed in and handed back untouched today: room for an arm that carries work from one site to the next
  (e.g. computing the next site's read in the same pass) without changing a caller's signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backends import TorchBackend, resolve, resolve_backend

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # h_pre [.., n], h_post [.., n], h_res [.., n, n]


class SiteKernels:
    """A backend's ops for one site call, with the call's link: the slot tensors its projection returned (when
    `linked`), passed on to its pre and post_res. Tensors only: nothing here is seen by a compiled graph but them."""

    def __init__(self, backend: TorchBackend, linked: bool = True):
        self.backend, self.linked, self.link = backend, linked, None

    def _links(self) -> bool:
        return self.linked and self.link is None and torch.is_grad_enabled()  # no backward, nothing to hand over

    def mhc_coefficients(self, x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6, sinkhorn_backward="unrolled"):
        """mHC's coefficients (`reference.mhc_coefficients_ref`); its projection makes the site's link."""
        implicit, linked = sinkhorn_backward == "implicit", self._links()
        out, link = self.backend.mhc_coefficients(x, phi, alpha, bias, iters, eps, implicit, linked)
        self.link = link if linked else self.link
        return out

    def mhc_coefficients_deepseek(self, x, phi, alpha, bias, iters: int, eps: float, hc_eps: float):
        """mHC's coefficients with DeepSeek-V4's arithmetic (`deepseek.mhc_coefficients_deepseek_ref`); linked."""
        linked = self._links()
        out, link = self.backend.mhc_coefficients_deepseek(x, phi, alpha, bias, iters, eps, hc_eps, linked)
        self.link = link if linked else self.link
        return out

    def hc_projection(self, x, weight, eps: float = 1e-6):
        """HC's per-stream RMSNorm @ weight (`reference.hc_projection_ref`); makes the site's link."""
        linked = self._links()
        h, link = self.backend.hc_projection(x, weight, eps, linked)
        self.link = link if linked else self.link
        return h

    def hc_gates(self, h, static, scale) -> Coefficients:
        return self.backend.hc_gates(h, static, scale)

    def pre(self, x, h_pre):
        return self.backend.pre(x, h_pre, self.link)

    def post_res(self, x, y, h_post, h_res):
        return self.backend.post_res(x, y, h_post, h_res, self.link)


CoefficientFn = Callable[[torch.Tensor, SiteKernels], Coefficients]


class SiteRead:
    """What a site's read half hands its write half: the mixing coefficients and the call's kernels."""

    __slots__ = ("h_post", "h_res", "kernels")

    def __init__(self, h_post, h_res, kernels: SiteKernels):
        self.h_post, self.h_res, self.kernels = h_post, h_res, kernels


class SiteStep:
    """One connection's site step, `connection.backend` resolved once per device (see the module docstring)."""

    def __init__(self, backend: str | TorchBackend = "auto"):
        if isinstance(backend, str):
            resolve_backend(backend, "meta")  # validate the name now (auto resolves per device later)
        self.name = backend if isinstance(backend, str) else backend.name
        self._spec = backend
        self._resolved: dict[torch.device, TorchBackend] = {}

    def backend(self, device: torch.device) -> TorchBackend:
        """The backend object for tensors on `device`: resolved on the first call for that device, cached after."""
        found = self._resolved.get(device)
        if found is None:
            found = self._resolved[device] = resolve(self._spec, device)
        return found

    def kernels(self, x: torch.Tensor, linked: bool = True) -> SiteKernels:
        return SiteKernels(self.backend(x.device), linked)

    def coefficients(self, coefficients: CoefficientFn, x: torch.Tensor, kernels: SiteKernels | None = None):
        """`coefficients(x, kernels)` in the fp32 coefficient region (unlinked unless `kernels` is given)."""
        kernels = kernels or self.kernels(x, linked=False)
        with kernels.backend.coefficient_region(x):
            return coefficients(x, kernels)

    def read(self, coefficients: CoefficientFn, x, linked: bool = True, pre: bool = True):
        """(F's input `H_pre x` [B, T, C] or None when not `pre`, the `SiteRead` for `write`)."""
        kernels = self.kernels(x, linked)
        h_pre, h_post, h_res = self.coefficients(coefficients, x, kernels)  # [B,T,n], [B,T,n], [B,T,n,n] | None
        return (kernels.pre(x, h_pre) if pre else None), SiteRead(h_post, h_res, kernels)

    @staticmethod
    def write(x, y, read: SiteRead, runner: Callable | None = None) -> torch.Tensor:
        """`H_res x + H_post^T y` [B, T, n, C]; `runner(fn, *args)` runs it (DualPipeV's priority stream) if given."""
        if runner is None:
            return read.kernels.post_res(x, y, read.h_post, read.h_res)
        return runner(read.kernels.post_res, x, y, read.h_post, read.h_res)

    def __call__(self, coefficients: CoefficientFn, x, sublayer, runner=None, state: Any = None, linked: bool = True):
        """The whole site: (x_{l+1} [B, T, n, C], state). `linked=False`: each op writes its own dx (the audit)."""
        f_in, read = self.read(coefficients, x, linked)
        return self.write(x, sublayer(f_in), read, runner), state
