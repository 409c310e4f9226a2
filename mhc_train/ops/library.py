"""The Triton kernels as `torch.library` custom ops (namespace `mhc_train`): opaque to torch.compile, traced through
their fake implementations, so a compiled block has no graph break at a connection site.

Axis legend: T tokens (leading axes flattened), n streams, C channels, K coefficient columns.

Each kernel is a forward op and a backward op (`*_bwd`), both `custom_op`s with a fake; the forward's autograd
(`register_autograd`) calls the backward op, so AOTAutograd traces the backward too. The kernels' launchers and
formulas stay in `mhc_kernels`; the ops here only call them (the gates' and Sinkhorn's launch code lives in their
autograd Functions, called here with a plain context object).

The site's one-dx chaining, tensors in and tensors out (`mhc_kernels/link.py` has the same hand-off done through a
Python object, for standalone kernel use): `projection_linked` returns, besides h and r, a `Link` of four slot tensors
(`g` [T, n, C], `h_res` [T, n, n], `f_grad` [T, C], `h_pre` [T, n]); `pre_linked` and `post_res_linked` take their two
slots as inputs. Their backwards write no dx: they return as the slots' gradients the terms the projection needs (dF_in
and h_pre; the site's output gradient g and H_res, None for the identity), and the projection's backward, which autograd
runs after both (it needs their slots' gradients), writes x's one gradient `dx = proj term + h_pre (x) dF_in + H_res^T
g` in its kernel. A term whose op did not run in a backward call arrives as None (the projection does not materialise
its gradients) and adds nothing. The slots carry no data forward: stride-0 views of one element, nothing allocated per
token.

Notable choices:
- `custom_op`, not `triton_op`: the launchers go through `mhc_kernels.utils.launch` (autotune, the traffic audit's
  capture), which Inductor cannot trace.
- The coefficient-side ops (gates + Sinkhorn, HC's gates, Sinkhorn alone) are in `library_gates.py`.
- The fake of each op also serves the traffic audit: on real meta tensors inside `mhc_kernels.utils.capture()` it
  runs the launcher (which records the launch and runs nothing).
- Split backwards (ZBV, DualPipeV) run the projection's backward twice; in eager it asks the engine which of x and
  phi this call needs (as `ProjectionFunction` does); under compile it uses `needs_input_grad`.
"""

from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

NS = "mhc_train"


class Link(NamedTuple):
    """A site's hand-over slots (see the module docstring): outputs of its projection, inputs of its pre/post_res."""

    g: torch.Tensor  # [T, n, C]: post_res's backward returns the site output's gradient as this slot's
    h_res: torch.Tensor  # [T, n, n]: ... and H_res (its gradient None when the site has none: the identity)
    f_grad: torch.Tensor  # [T, C]: pre's backward returns dF_in
    h_pre: torch.Tensor  # [T, n]: ... and h_pre


def _k():
    import mhc_kernels

    return mhc_kernels


def _slot(like: torch.Tensor, *shape, dtype=torch.float32) -> torch.Tensor:
    """A slot: never read, it carries a gradient only, in its dtype (autograd casts a gradient to its input's)."""
    return like.new_empty((), dtype=dtype).expand(*shape)


def _slots(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A `Link`'s slots for x [T, n, C]: g and f_grad in x's dtype (the site's output and F's input are), h_res and
    h_pre fp32."""
    T, n, C = x.shape
    return _slot(x, T, n, C, dtype=x.dtype), _slot(x, T, n, n), _slot(x, T, C, dtype=x.dtype), _slot(x, T, n)


def _recording(*tensors) -> bool:
    """Real meta tensors inside the audit's capture: run the launcher (it records and runs nothing)."""
    from mhc_kernels.utils import capturing

    t = tensors[0]
    return capturing() and t.device.type == "meta" and not isinstance(t, FakeTensor)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _eager() -> bool:
    return not torch.compiler.is_compiling()


def _check_fp32(**tensors) -> None:
    from mhc_kernels.utils import check_tensor

    for name, t in tensors.items():
        check_tensor(name, t, (torch.float32,))


class _Ctx(SimpleNamespace):
    """The context an autograd Function's forward/backward reads, for calling them outside autograd."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


# ---- projection (kernel 1), the owner of a site's one dx ----


@torch.library.custom_op(f"{NS}::projection", mutates_args=())
def projection(x: torch.Tensor, phi: torch.Tensor, eps: float, per_stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, n, C], phi [nC, K] fp32 -> (h [T, K] fp32, r [T] or [T, n] fp32)."""
    from mhc_kernels.projection import projection_fwd

    return projection_fwd(x, phi, eps, per_stream)


@projection.register_fake
def _(x, phi, eps, per_stream):
    if _recording(x):
        return projection._init_fn(x, phi, eps, per_stream)
    T, n, _ = x.shape
    return x.new_empty(T, phi.shape[1], dtype=torch.float32), x.new_empty(
        (T, n) if per_stream else (T,), dtype=torch.float32
    )


@torch.library.custom_op(f"{NS}::projection_linked", mutates_args=())
def projection_linked(
    x: torch.Tensor, phi: torch.Tensor, eps: float, per_stream: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`projection` plus the site's `Link` slots (h, r, g, h_res, f_grad, h_pre)."""
    from mhc_kernels.projection import projection_fwd

    T, n, C = x.shape
    h, r = projection_fwd(x, phi, eps, per_stream)
    return h, r, *_slots(x)


@projection_linked.register_fake
def _(x, phi, eps, per_stream):
    if _recording(x):
        return projection_linked._init_fn(x, phi, eps, per_stream)
    T, n, C = x.shape
    h, r = (
        x.new_empty(T, phi.shape[1], dtype=torch.float32),
        x.new_empty((T, n) if per_stream else (T,), dtype=torch.float32),
    )
    return h, r, *_slots(x)


@torch.library.custom_op(f"{NS}::projection_bwd", mutates_args=())
def projection_bwd(
    x: torch.Tensor,
    phi: torch.Tensor,
    h: torch.Tensor,
    r: torch.Tensor,
    gh: torch.Tensor,
    per_stream: int,
    want_dx: bool,
    want_dphi: bool,
    g: torch.Tensor | None,
    h_res: torch.Tensor | None,
    f_grad: torch.Tensor | None,
    h_pre: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [T, n, C] or empty, dphi [nC, K] or empty); with the link's terms dx is the site's one gradient of x."""
    from mhc_kernels.projection import projection_bwd as bwd

    dx, dphi = bwd(x, phi, h, r, gh, per_stream, want_dx, g, h_res, f_grad, h_pre, want_dphi)
    return (dx if want_dx else _empty(x)), (dphi if want_dphi else _empty(phi))


@projection_bwd.register_fake
def _(x, phi, h, r, gh, per_stream, want_dx, want_dphi, g, h_res, f_grad, h_pre):
    if _recording(x):
        return projection_bwd._init_fn(x, phi, h, r, gh, per_stream, want_dx, want_dphi, g, h_res, f_grad, h_pre)
    return (torch.empty_like(x) if want_dx else _empty(x)), (torch.empty_like(phi) if want_dphi else _empty(phi))


def _projection_setup(ctx, inputs, output):
    x, phi, eps, per_stream = inputs
    ctx.per_stream = per_stream
    ctx.save_for_backward(x, phi, output[0], output[1])
    ctx.mark_non_differentiable(*output[1:2])
    ctx.set_materialize_grads(False)  # a slot whose op did not run brings None: no term, nothing allocated
    # eager: the nodes of x's and phi's views (see `_own_node`), to ask the engine what this backward call needs
    ctx.nodes = [t.grad_fn if t.requires_grad else None for t in (x, phi)] if _eager() else None


def _wanted(ctx) -> tuple[bool, bool]:
    if ctx.nodes is not None:
        return tuple(node is not None and torch._C._will_engine_execute_node(node) for node in ctx.nodes)
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1]


def _projection_backward(ctx, gh, _r, g=None, h_res=None, f_grad=None, h_pre=None):
    """The slots' gradients are the link's terms: (g, H_res) from post_res (H_res None: the identity) and (dF_in,
    h_pre) from pre; a pair is None when its op did not run in this backward call (or the op is unlinked)."""
    x, phi, h, r = ctx.saved_tensors
    want_dx, want_dphi = _wanted(ctx)
    if not (want_dx or want_dphi):
        return None, None, None, None
    gh = torch.zeros_like(h) if gh is None else gh.contiguous().float()
    if g is None or not want_dx:
        g = h_res = None
    else:
        g, h_res = g.to(x.dtype).contiguous(), (None if h_res is None else h_res.float().contiguous())
    if f_grad is None or not want_dx:
        f_grad = h_pre = None
    else:
        f_grad, h_pre = f_grad.contiguous(), h_pre.float().contiguous()
    dx, dphi = projection_bwd(x, phi, h, r, gh, ctx.per_stream, want_dx, want_dphi, g, h_res, f_grad, h_pre)
    return (dx if want_dx else None), (dphi if want_dphi else None), None, None


projection.register_autograd(_projection_backward, setup_context=_projection_setup)
projection_linked.register_autograd(_projection_backward, setup_context=_projection_setup)


def _own_node(t: torch.Tensor) -> torch.Tensor:
    """t as a view with a grad_fn of its own in eager (the backward can ask whether it is wanted)."""
    return t.view_as(t) if t.requires_grad and _eager() else t


def mhc_projection(x, phi, eps: float = 1e-6, per_stream: int = 0, linked: bool = False):
    """x [..., n, C], phi [nC, K] fp32 -> (h [..., K] fp32, `Link` or None); checks as `mhc_kernels.mhc_projection`."""
    from mhc_kernels.utils import STREAM_DTYPES, check_tensor

    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    check_tensor("x", x, STREAM_DTYPES)
    check_tensor("phi", phi, (torch.float32,))
    if phi.shape[0] != n * C:
        raise ValueError(f"phi must have n*C = {n * C} rows for x of shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    args = (_own_node(x.reshape(-1, n, C)), _own_node(phi), eps, per_stream)
    if not linked:
        return projection(*args)[0].reshape(*lead, phi.shape[1]), None
    h, _r, *slots = projection_linked(*args)
    return h.reshape(*lead, phi.shape[1]), Link(*slots)


# ---- pre (kernel 3) and post_res (kernel 4) ----


@torch.library.custom_op(f"{NS}::pre", mutates_args=())
def pre(x: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    """x [T, n, C], h_pre [T, n] fp32 -> F_in [T, C] in x's dtype."""
    from mhc_kernels.stream_mix import mhc_pre_fwd

    return mhc_pre_fwd(x, h_pre)


@torch.library.custom_op(f"{NS}::pre_linked", mutates_args=())
def pre_linked(
    x: torch.Tensor, h_pre: torch.Tensor, link_f_grad: torch.Tensor, link_h_pre: torch.Tensor
) -> torch.Tensor:
    """`pre` whose backward hands (dF_in, h_pre) to the site's projection through the two slots."""
    from mhc_kernels.stream_mix import mhc_pre_fwd

    return mhc_pre_fwd(x, h_pre)


def _pre_fake(x, h_pre, *slots):
    if _recording(x):
        return pre._init_fn(x, h_pre)
    return x.new_empty(x.shape[0], x.shape[2])


pre.register_fake(_pre_fake)
pre_linked.register_fake(_pre_fake)


@torch.library.custom_op(f"{NS}::pre_bwd", mutates_args=())
def pre_bwd(x: torch.Tensor, h_pre: torch.Tensor, g: torch.Tensor, write_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx or empty, dh_pre)."""
    from mhc_kernels.stream_mix import mhc_pre_bwd

    dx, dh = mhc_pre_bwd(x, h_pre, g, write_dx=write_dx)
    return (dx if write_dx else _empty(x)), dh


@pre_bwd.register_fake
def _(x, h_pre, g, write_dx):
    if _recording(x):
        return pre_bwd._init_fn(x, h_pre, g, write_dx)
    return (torch.empty_like(x) if write_dx else _empty(x)), torch.empty_like(h_pre)


def _save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _pre_backward(ctx, g):
    x, h_pre = ctx.saved_tensors[:2]
    g = g.contiguous()
    linked = len(ctx.needs_input_grad) > 2
    need_x = ctx.needs_input_grad[0]
    dx, dh = pre_bwd(x, h_pre, g, need_x and not linked)
    grads = (dx if need_x and not linked else None, dh if ctx.needs_input_grad[1] else None)
    return (*grads, g, h_pre) if linked else grads


pre.register_autograd(_pre_backward, setup_context=_save_inputs)
pre_linked.register_autograd(_pre_backward, setup_context=_save_inputs)


@torch.library.custom_op(f"{NS}::post_res", mutates_args=())
def post_res(x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None) -> torch.Tensor:
    """x [T, n, C], y [T, C], h_post [T, n], h_res [T, n, n] fp32 or None (identity) -> [T, n, C] in x's dtype."""
    from mhc_kernels.stream_mix import mhc_post_res_fwd

    return mhc_post_res_fwd(x, y, h_post, h_res)


@torch.library.custom_op(f"{NS}::post_res_linked", mutates_args=())
def post_res_linked(
    x: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor | None,
    link_g: torch.Tensor,
    link_h_res: torch.Tensor,
) -> torch.Tensor:
    """`post_res` whose backward hands (g, H_res) to the site's projection through the two slots."""
    from mhc_kernels.stream_mix import mhc_post_res_fwd

    return mhc_post_res_fwd(x, y, h_post, h_res)


def _post_res_fake(x, y, h_post, h_res, *slots):
    if _recording(x):
        return post_res._init_fn(x, y, h_post, h_res)
    return torch.empty_like(x)


post_res.register_fake(_post_res_fake)
post_res_linked.register_fake(_post_res_fake)


@torch.library.custom_op(f"{NS}::post_res_bwd", mutates_args=())
def post_res_bwd(
    x: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor | None, g: torch.Tensor, write_dx: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx or empty, dy, dh_post, dh_res or empty)."""
    from mhc_kernels.stream_mix import mhc_post_res_bwd

    dx, dy, dhp, dhr = mhc_post_res_bwd(x, y, h_post, h_res, g, write_dx=write_dx)
    return (dx if write_dx else _empty(x)), dy, dhp, (_empty(x) if dhr is None else dhr)


@post_res_bwd.register_fake
def _(x, y, h_post, h_res, g, write_dx):
    if _recording(x):
        return post_res_bwd._init_fn(x, y, h_post, h_res, g, write_dx)
    dhr = _empty(x) if h_res is None else torch.empty_like(h_res)
    return (torch.empty_like(x) if write_dx else _empty(x)), torch.empty_like(y), torch.empty_like(h_post), dhr


def _post_res_setup(ctx, inputs, output):
    x, y, h_post, h_res = inputs[:4]
    ctx.has_res = h_res is not None
    ctx.save_for_backward(x, y, h_post, h_res if ctx.has_res else None)


def _post_res_backward(ctx, g):
    x, y, h_post, h_res = ctx.saved_tensors
    g = g.contiguous()
    need, linked = ctx.needs_input_grad, len(ctx.needs_input_grad) > 4
    dx, dy, dhp, dhr = post_res_bwd(x, y, h_post, h_res, g, need[0] and not linked)
    grads = (
        dx if need[0] and not linked else None,
        dy if need[1] else None,
        dhp if need[2] else None,
        dhr if need[3] and ctx.has_res else None,
    )
    if not linked:
        return grads
    return (*grads, g, h_res if ctx.has_res else None)  # no H_res: None, the identity (the projection adds g)


post_res.register_autograd(_post_res_backward, setup_context=_post_res_setup)
post_res_linked.register_autograd(_post_res_backward, setup_context=_post_res_setup)


def mhc_pre(x, h_pre, link: Link | None = None):
    """x [..., n, C], h_pre [..., n] fp32 -> [..., C]; `link`: the site's slots (x's gradient: its projection's)."""
    from mhc_kernels.stream_mix import _check

    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    _check(n, x=x, h_pre=h_pre)
    args = (x.reshape(-1, n, C), h_pre.reshape(-1, n))
    out = pre(*args) if link is None else pre_linked(*args, link.f_grad, link.h_pre)
    return out.reshape(*lead, C)


def mhc_post_res(x, y, h_post, h_res, link: Link | None = None):
    """x [..., n, C], y [..., C], h_post [..., n], h_res [..., n, n] or None -> [..., n, C]; `link` as in `mhc_pre`."""
    from mhc_kernels.stream_mix import _check

    lead, (n, C) = x.shape[:-2], x.shape[-2:]
    _check(n, x=x, y=y, h_post=h_post, h_res=h_res)
    args = (
        x.reshape(-1, n, C),
        y.reshape(-1, C),
        h_post.reshape(-1, n),
        None if h_res is None else h_res.reshape(-1, n, n),
    )
    out = post_res(*args) if link is None else post_res_linked(*args, link.g, link.h_res)
    return out.reshape(*lead, n, C)
