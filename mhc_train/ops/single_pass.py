"""Single-pass (lagged) mHC's site ops on the packed state (docs/mhc.md section 10): the torch reference of the fused
read and write, and the Triton ops (`mhc_kernels/single_pass.py`) that the arm's step runs on the triton backend.

Axis legend: `...` leading token axes, n streams, C channels, K = n^2 + 2n coefficient columns. The packed state is
[..., n + 1, C]: rows 0..n-1 the streams, row n the carried read mix in its first n channels (model/single_pass.py).

- `single_pass_read_ref(state, phi, eps)` -> (F_in = m . x, h = RMSNorm(vec x) @ phi with the reordered norm)
- `single_pass_write_ref(state, y, h_post, h_res, mix)` -> [H_res x + h_post (x) y ; the next mix, zero-padded]
- `single_pass_read` / `single_pass_write`: the same on the kernels, one pass over the stream each (autograd
  Functions saving their inputs, and h and r). Backward: the write's kernel reads g, x, y and writes dy, dh_post,
  dH_res; it hands (g, H_res) through the read's link slots to the read's kernel, which writes the site's one
  gradient of the packed state (projection term, the mix's F_in term, H_res^T g, and the mix's own gradient in row
  n, from per-channel-block partials the kernel writes) and dphi: the other arms' one-dx chaining.
- Under torch.compile both run as the custom ops of `library_single_pass.py` (no graph break at a site); the two
  backwards' bodies (`single_pass_grads.py`) are shared with them, the kernel's launch or its op passed in.
- Cross-site fusion: `single_pass_write(..., ahead=Prefetch(next phi, eps))` runs the fused boundary kernel
  (`mhc_kernels/single_pass_fused.py`), which also computes the next site's read of the state it returns;
  `single_pass_read(..., fetched=prefetch.take(state))` then returns those values instead of launching (same bits).
- `SinglePassKernels`: a `SiteKernels` whose coefficient methods run the fused read (its F_in kept for the step) and
  the backend's usual coefficient tail (gates + Sinkhorn kernel, or DeepSeek's torch tail).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .deepseek import mhc_coefficients_deepseek_ref
from .reference import mhc_coefficients_ref, mhc_post_res_ref, mhc_pre_ref, mhc_projection_ref
from .single_pass_grads import read_grads, write_grads
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


def _own_node(t: torch.Tensor) -> torch.Tensor:
    """t as a view with a grad_fn of its own: the backward can ask the engine whether t's gradient is wanted in this
    call (split backwards run input and weight gradients apart; `library.py`)."""
    return t.view_as(t) if t.requires_grad else t


def _slot(like: torch.Tensor, *shape, dtype) -> torch.Tensor:
    """A link slot (`library.py`): never read, it carries the write's (g, H_res) to the read's backward."""
    return like.new_empty((), dtype=dtype).expand(*shape)


class SinglePassRead(torch.autograd.Function):
    """One pass over the packed state: F_in and the projection; saves state, phi, h and r. Also returns the site's
    link slots (g [T, n+1, C], H_res [T, n, n]): `SinglePassWrite` takes them, and its backward returns (g, H_res)
    as their gradients, so this backward writes the state's one gradient (its own terms and H_res^T g) in one kernel."""

    @staticmethod
    def forward(ctx, state, phi, eps, fetched=None):
        from mhc_kernels.single_pass import sp_read_fwd

        # fetched: (F_in, h, r) the previous site's fused write computed from this very state (`Prefetch`)
        f_in, h, r = sp_read_fwd(state, phi, eps) if fetched is None else fetched
        ctx.save_for_backward(state, phi, h, r)
        ctx.set_materialize_grads(False)
        ctx.nodes = [t.grad_fn if t.requires_grad else None for t in (state, phi)]
        T, rows, C = state.shape
        slots = _slot(state, T, rows, C, dtype=state.dtype), _slot(state, T, rows - 1, rows - 1, dtype=torch.float32)
        return f_in, h, *slots

    @staticmethod
    def backward(ctx, g_fin, g_h, g_link, hres_link):
        from mhc_kernels.single_pass_bwd import sp_read_bwd

        ds, dphi = read_grads(sp_read_bwd, ctx, g_fin, g_h, g_link, hres_link)
        return ds, dphi, None, None


class SinglePassWrite(torch.autograd.Function):
    """One pass writing the next packed state; saves state, y, h_post, h_res. Linked (the read's slots given): its
    backward writes no state gradient and returns (g, H_res) as the slots' gradients; unlinked: H_res^T g in torch."""

    @staticmethod
    def forward(ctx, state, y, h_post, h_res, mix, g_slot, hres_slot, ahead=None):
        from mhc_kernels.single_pass import sp_write_fwd
        from mhc_kernels.single_pass_fused import sp_write_read_fwd

        ctx.linked = g_slot is not None
        ctx.save_for_backward(state, y, h_post, h_res)
        if ahead is None:
            return sp_write_fwd(state, y, h_post, h_res, mix)
        out, f_in, h, r = sp_write_read_fwd(state, y, h_post, h_res, mix, ahead.phi, ahead.eps)
        ahead.values = (f_in, h, r)  # not outputs: the next site's read returns them (its own autograd node)
        return out

    @staticmethod
    def backward(ctx, g):
        from mhc_kernels.single_pass_bwd import sp_write_bwd

        grads = write_grads(sp_write_bwd, ctx, g)
        return *grads, *(None,) * (8 - len(grads))  # the slots' (unlinked) and `ahead`'s


def _check(state: torch.Tensor) -> None:
    from mhc_kernels.utils import MAX_STREAMS, STREAM_DTYPES, check_tensor

    check_tensor("state", state, STREAM_DTYPES)
    n = state.shape[-2] - 1
    if n > MAX_STREAMS or state.shape[-1] < n:
        raise ValueError(f"the single-pass kernels take 1 <= n <= {MAX_STREAMS} and C >= n; got state {state.shape}")


def _phi(phi: torch.Tensor) -> torch.Tensor:
    return phi if phi.dtype == torch.float32 and phi.is_contiguous() else phi.float().contiguous()


class Prefetch:
    """Site l+1's read, computed by site l's fused write (`single_pass_write(..., ahead=Prefetch(phi, eps))`): after
    the write, `values` holds (F_in, h, r) of the state it returned (`state`, a weak reference). The next site takes
    them only for that very tensor (`take`); any other input (a pipeline boundary, a recompute replay) reads it anew.
    The values are dropped when that tensor dies (no take could succeed after): a read nobody took is not held on."""

    __slots__ = ("phi", "eps", "values", "_state")

    def __init__(self, phi: torch.Tensor, eps: float):
        self.phi, self.eps, self.values, self._state = _phi(phi.detach()), eps, None, None

    def bind(self, state: torch.Tensor) -> None:
        self._state = weakref.ref(state, self._drop)

    def _drop(self, _ref) -> None:
        self.values = None

    def take(self, state: torch.Tensor):
        """(F_in, h, r) flattened over tokens when computed from `state` itself, else None."""
        ok = self.values is not None and self._state is not None and self._state() is state
        return tuple(self.values) if ok else None


def single_pass_read(state: torch.Tensor, phi: torch.Tensor, eps: float = 1e-6, fetched=None):
    """`single_pass_read_ref` on the kernel: state [..., n+1, C] (contiguous), phi [nC, K] -> (F_in, h fp32, link):
    `link` (the slots) goes to this site's `single_pass_write`, whose backward then hands the read's backward its
    terms (one gradient of the state per site). `fetched`: `Prefetch.take(state)` (no kernel runs; same values)."""
    lead, (rows, C) = state.shape[:-2], state.shape[-2:]
    _check(state)
    phi = _phi(phi)
    if torch.compiler.is_compiling():  # the custom ops (no prefetch inside a graph: `SinglePassStep.run`)
        from . import library_single_pass

        f_in, h, link = library_single_pass.read(state.reshape(-1, rows, C), phi, eps)
        return f_in.reshape(*lead, C), h.reshape(*lead, phi.shape[1]), link
    f_in, h, *link = SinglePassRead.apply(_own_node(state.reshape(-1, rows, C)), _own_node(phi), eps, fetched)
    return f_in.reshape(*lead, C), h.reshape(*lead, phi.shape[1]), tuple(link)


def single_pass_write(state, y, h_post, h_res, mix, link=None, ahead: Prefetch | None = None):
    """`single_pass_write_ref` on the kernel (coefficients cast to fp32, y in any stream dtype); `link`: the site's
    from `single_pass_read` (None: the backward writes its own gradient of the state). `ahead`: the next site's
    `Prefetch` (its phi and eps): the same kernel pass also computes that site's read of the returned state."""
    lead, (rows, C) = state.shape[:-2], state.shape[-2:]
    n = rows - 1
    _check(state)
    args = (
        state.reshape(-1, rows, C),
        y.reshape(-1, C).contiguous(),
        h_post.reshape(-1, n).float().contiguous(),
        h_res.reshape(-1, n, n).float().contiguous(),
        mix.reshape(-1, n).float().contiguous(),
    )
    if torch.compiler.is_compiling():  # the custom ops (`library_single_pass.py`); never fused ahead there
        from . import library_single_pass

        return library_single_pass.write(*args, link).reshape(*lead, rows, C)
    out = SinglePassWrite.apply(*args, *(link or (None, None)), ahead)
    out = out.reshape(*lead, rows, C)
    if ahead is not None:
        ahead.bind(out)
    return out


class SinglePassKernels(SiteKernels):
    """The triton backend's ops for one single-pass site call: the coefficient methods project through the fused read
    of the packed `state` (keeping F's input in `f_in`), then run the backend's coefficient tail; no link."""

    def __init__(self, backend, state: torch.Tensor, fetched=None):
        super().__init__(backend, linked=False)
        self.state, self.f_in, self.fetched = state.contiguous(), None, fetched

    def _project(self, phi, eps):
        self.f_in, h, link = single_pass_read(self.state, phi, eps, self.fetched)
        self.link = link if torch.is_grad_enabled() else None
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
