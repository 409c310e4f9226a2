"""Single-pass (lagged) mHC's site ops on the packed state (docs/mhc.md section 10): the torch reference of the fused
read and write, and the Triton ops (`mhc_kernels/single_pass.py`) that the arm's step runs on the triton backend.

Axis legend: `...` leading token axes, n streams, C channels, K = n^2 + 2n coefficient columns. The packed state is
[..., n + 1, C]: rows 0..n-1 the streams, row n the carried read mix in its first n channels (model/single_pass.py).

- `single_pass_read_ref(state, phi, eps)` -> (F_in = m . x, h = RMSNorm(vec x) @ phi with the reordered norm)
- `single_pass_write_ref(state, y, h_post, h_res, mix)` -> [H_res x + h_post (x) y ; the next mix, zero-padded]
- `single_pass_read` / `single_pass_write`: the same on the kernels, one pass over the stream each (autograd
  Functions). Their backward recomputes the reference from the saved inputs (no intermediates kept) and differentiates
  it with autograd: no fused backward kernel yet, and each op writes its own gradient of the state (autograd adds the
  two), so the other arms' one-dx chaining is not done here.
- `SinglePassKernels`: a `SiteKernels` whose coefficient methods run the fused read (its F_in kept for the step) and
  the backend's usual coefficient tail (gates + Sinkhorn kernel, or DeepSeek's torch tail).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .deepseek import mhc_coefficients_deepseek_ref
from .reference import mhc_coefficients_ref, mhc_post_res_ref, mhc_pre_ref, mhc_projection_ref
from .sinkhorn import sinkhorn_knopp_implicit
from .step import SiteKernels


def _split(state: torch.Tensor):
    n = state.shape[-2] - 1
    return state[..., :n, :], state[..., n, :n]


def single_pass_read_ref(state: torch.Tensor, phi: torch.Tensor, eps: float):
    """state [..., n+1, C], phi [nC, K] -> (F_in [..., C] in the state's dtype, h [..., K] in the coefficient dtype)."""
    x, mix = _split(state)
    return mhc_pre_ref(x, mix), mhc_projection_ref(x, phi, eps)


def single_pass_write_ref(state, y, h_post, h_res, mix):
    """state [..., n+1, C], y [..., C], h_post [..., n], h_res [..., n, n], mix [..., n] -> [..., n+1, C]."""
    x, _ = _split(state)
    out = mhc_post_res_ref(x, y, h_post, h_res)  # [..., n, C]
    row = F.pad(mix.to(state.dtype), (0, state.shape[-1] - mix.shape[-1])).unsqueeze(-2)  # [..., 1, C]
    return torch.cat([out, row], dim=-2)


def _recompute_grads(ref, inputs, outputs_grads):
    """Gradients of `ref(*inputs)` for the inputs that need them, from a recomputation of the reference."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
        outs = ref(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, outputs_grads) if g is not None]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    it = iter(grads)
    return [next(it) if t is not None and t.requires_grad else None for t in leaves]


class SinglePassRead(torch.autograd.Function):
    """One pass over the packed state: F_in and the projection (mhc_kernels/single_pass.py). Saves the inputs."""

    @staticmethod
    def forward(ctx, state, phi, eps):
        from mhc_kernels.single_pass import sp_read_fwd

        f_in, h, _r = sp_read_fwd(state, phi, eps)
        ctx.eps = eps
        ctx.save_for_backward(state, phi)
        ctx.set_materialize_grads(False)
        return f_in, h

    @staticmethod
    def backward(ctx, g_fin, g_h):
        state, phi = ctx.saved_tensors
        if g_fin is None and g_h is None:
            return None, None, None
        ds, dphi = _recompute_grads(lambda s, p: single_pass_read_ref(s, p, ctx.eps), (state, phi), (g_fin, g_h))
        return ds, dphi, None


class SinglePassWrite(torch.autograd.Function):
    """One pass writing the next packed state (mhc_kernels/single_pass.py). Saves the inputs."""

    @staticmethod
    def forward(ctx, state, y, h_post, h_res, mix):
        from mhc_kernels.single_pass import sp_write_fwd

        ctx.save_for_backward(state, y, h_post, h_res, mix)
        return sp_write_fwd(state, y, h_post, h_res, mix)

    @staticmethod
    def backward(ctx, g):
        return tuple(_recompute_grads(single_pass_write_ref, ctx.saved_tensors, (g,)))


def _check(state: torch.Tensor) -> None:
    from mhc_kernels.utils import MAX_STREAMS, STREAM_DTYPES, check_tensor

    check_tensor("state", state, STREAM_DTYPES)
    n = state.shape[-2] - 1
    if n > MAX_STREAMS or state.shape[-1] < n:
        raise ValueError(f"the single-pass kernels take 1 <= n <= {MAX_STREAMS} and C >= n; got state {state.shape}")


def single_pass_read(state: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6):
    """`single_pass_read_ref` on the kernel: state [..., n+1, C] (contiguous), phi [nC, K] -> (F_in, h fp32)."""
    lead, (rows, C) = state.shape[:-2], state.shape[-2:]
    _check(state)
    f_in, h = SinglePassRead.apply(state.reshape(-1, rows, C), phi.float().contiguous(), eps)
    return f_in.reshape(*lead, C), h.reshape(*lead, phi.shape[1])


def single_pass_write(state, y, h_post, h_res, mix):
    """`single_pass_write_ref` on the kernel (coefficients cast to fp32, y in any stream dtype)."""
    lead, (rows, C) = state.shape[:-2], state.shape[-2:]
    n = rows - 1
    _check(state)
    out = SinglePassWrite.apply(
        state.reshape(-1, rows, C),
        y.reshape(-1, C).contiguous(),
        h_post.reshape(-1, n).float().contiguous(),
        h_res.reshape(-1, n, n).float().contiguous(),
        mix.reshape(-1, n).float().contiguous(),
    )
    return out.reshape(*lead, rows, C)


class SinglePassKernels(SiteKernels):
    """The triton backend's ops for one single-pass site call: the coefficient methods project through the fused read
    of the packed `state` (keeping F's input in `f_in`), then run the backend's coefficient tail; no link."""

    def __init__(self, backend, state: torch.Tensor):
        super().__init__(backend, linked=False)
        self.state, self.f_in = state.contiguous(), None

    def _project(self, phi, eps):
        self.f_in, h = single_pass_read(self.state, phi, eps)
        return h

    def mhc_coefficients(self, x, phi, alpha, bias, iters: int = 20, eps: float = 1e-6, sinkhorn_backward="unrolled"):
        from . import library_gates

        h = self._project(phi, eps)
        if sinkhorn_backward == "implicit":
            project = lambda v, p, e: h  # noqa: E731
            return mhc_coefficients_ref(x, phi, alpha, bias, iters, eps, sinkhorn_knopp_implicit, project)
        n = x.shape[-2]
        return library_gates.mhc_gates_sinkhorn(h, alpha.float().contiguous(), bias.float().contiguous(), n, iters)

    def mhc_coefficients_deepseek(self, x, phi, alpha, bias, iters: int, eps: float, hc_eps: float):
        h = self._project(phi, eps)
        project = lambda v, p, e: h  # noqa: E731
        return mhc_coefficients_deepseek_ref(x, phi, alpha, bias, iters, eps, hc_eps, projection=project)
