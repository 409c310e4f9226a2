"""The coefficient-side Triton kernels as `torch.library` ops (namespace `mhc_train`): mHC's gates + Sinkhorn (kernel
2), HC's gates, and Sinkhorn alone; each a forward op and a backward op with fakes, as in `library.py` (the stream
side and the site's link). Their launch code lives in the kernels' autograd Functions, called here with a plain
context object, so the kernels' sources are unchanged.

Axis legend: T tokens, n streams, K coefficient columns.
"""

import torch

from .library import NS, _check_fp32, _Ctx, _empty, _k, _recording


def _hc_mod():
    import importlib

    return importlib.import_module("mhc_kernels.hc_gates")  # `mhc_kernels.hc_gates` is also a function's name


# ---- gates + Sinkhorn (kernel 2), HC's gates, Sinkhorn alone: their launch code is in their Functions ----


@torch.library.custom_op(f"{NS}::gates_sinkhorn", mutates_args=())
def gates_sinkhorn(
    h: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, n: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, K] -> (h_pre [T, n], h_post [T, n], h_res [T, n, n], or empty when K = 2n)."""
    pre_, post, res = _k().gates.GatesSinkhornFunction.forward(_Ctx(), h, alpha, bias, n, iters)
    return pre_, post, (_empty(h) if res is None else res)


@gates_sinkhorn.register_fake
def _(h, alpha, bias, n, iters):
    if _recording(h):
        return gates_sinkhorn._init_fn(h, alpha, bias, n, iters)
    T, K = h.shape
    res = h.new_empty(T, n, n) if K == n * n + 2 * n else _empty(h)
    return h.new_empty(T, n), h.new_empty(T, n), res


@torch.library.custom_op(f"{NS}::gates_sinkhorn_bwd", mutates_args=())
def gates_sinkhorn_bwd(
    h: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor,
    pre_: torch.Tensor,
    post: torch.Tensor,
    d_pre: torch.Tensor,
    d_post: torch.Tensor,
    d_res: torch.Tensor | None,
    n: int,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ctx = _Ctx(n=n, iters=iters, has_res=d_res is not None, saved_tensors=(h, alpha, bias, pre_, post))
    ctx.needs_input_grad = (True, True, True, False, False)
    return _k().gates.GatesSinkhornFunction.backward(ctx, d_pre, d_post, d_res)[:3]


@gates_sinkhorn_bwd.register_fake
def _(h, alpha, bias, pre_, post, d_pre, d_post, d_res, n, iters):
    if _recording(h):
        return gates_sinkhorn_bwd._init_fn(h, alpha, bias, pre_, post, d_pre, d_post, d_res, n, iters)
    return torch.empty_like(h), torch.empty_like(alpha), torch.empty_like(bias)


def _gates_setup(ctx, inputs, output):
    h, alpha, bias, n, iters = inputs
    ctx.n, ctx.iters, ctx.has_res = n, iters, h.shape[1] == n * n + 2 * n
    ctx.save_for_backward(h, alpha, bias, output[0], output[1])
    ctx.set_materialize_grads(False)  # no zeros for the empty h_res placeholder of the identity arm


def _gates_backward(ctx, d_pre, d_post, d_res):
    h, alpha, bias, pre_, post = ctx.saved_tensors
    d_pre, d_post = (torch.zeros_like(t) if d is None else d for d, t in ((d_pre, pre_), (d_post, post)))
    if ctx.has_res and d_res is None:
        d_res = h.new_zeros(h.shape[0], ctx.n, ctx.n)
    dh, da, db = gates_sinkhorn_bwd(
        h, alpha, bias, pre_, post, d_pre, d_post, d_res if ctx.has_res else None, ctx.n, ctx.iters
    )
    need = ctx.needs_input_grad
    return (dh if need[0] else None), (da if need[1] else None), (db if need[2] else None), None, None


gates_sinkhorn.register_autograd(_gates_backward, setup_context=_gates_setup)


def mhc_gates_sinkhorn(h, alpha, bias, n: int, iters: int = 20):
    """h [..., K] fp32 -> (h_pre [..., n], h_post [..., n], h_res [..., n, n] or None); as the kernel's function."""
    lead, K = h.shape[:-1], h.shape[-1]
    if K not in (n * n + 2 * n, 2 * n):
        raise ValueError(f"h must have n*n+2n = {n * n + 2 * n} (or 2n = {2 * n}) columns for n = {n}, got {K}")
    _check_fp32(h=h, alpha=alpha, bias=bias)
    p, q, r = gates_sinkhorn(h.reshape(-1, K), alpha, bias, n, iters)
    return p.reshape(*lead, n), q.reshape(*lead, n), (r.reshape(*lead, n, n) if K == n * n + 2 * n else None)


@torch.library.custom_op(f"{NS}::hc_gates", mutates_args=())
def hc_gates(
    h: torch.Tensor, static: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [T, n, n+2] fp32 -> (h_pre [T, n], h_post [T, n], h_res [T, n, n])."""
    return _hc_mod().HcGatesFunction.forward(_Ctx(), h, static, scale)


@hc_gates.register_fake
def _(h, static, scale):
    if _recording(h):
        return hc_gates._init_fn(h, static, scale)
    T, n, _ = h.shape
    return h.new_empty(T, n), h.new_empty(T, n), h.new_empty(T, n, n)


@torch.library.custom_op(f"{NS}::hc_gates_bwd", mutates_args=())
def hc_gates_bwd(
    h: torch.Tensor, scale: torch.Tensor, d_pre: torch.Tensor, d_post: torch.Tensor, d_res: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dstatic, dscale)."""
    ctx = _Ctx(saved_tensors=(h, scale), needs_input_grad=(True, True, True))
    return _hc_mod().HcGatesFunction.backward(ctx, d_pre, d_post, d_res)


@hc_gates_bwd.register_fake
def _(h, scale, d_pre, d_post, d_res):
    if _recording(h):
        return hc_gates_bwd._init_fn(h, scale, d_pre, d_post, d_res)
    T, n, k_s = h.shape
    return torch.empty_like(h), h.new_empty(n, k_s), torch.empty_like(scale)


def _hc_gates_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[2])


def _hc_gates_backward(ctx, d_pre, d_post, d_res):
    h, scale = ctx.saved_tensors
    dh, dstatic, dscale = hc_gates_bwd(h, scale, d_pre, d_post, d_res)
    need = ctx.needs_input_grad
    return (dh if need[0] else None), (dstatic if need[1] else None), (dscale if need[2] else None)


hc_gates.register_autograd(_hc_gates_backward, setup_context=_hc_gates_setup)


def hc_coefficients(h, static, scale):
    """h [..., n, n+2] fp32, static [n, n+2], scale [n+2] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n])."""
    lead, (n, k_s) = h.shape[:-2], h.shape[-2:]
    if k_s != n + 2 or static.shape != (n, k_s) or scale.shape != (k_s,):
        raise ValueError(
            f"hc_gates: h must be [..., n, n+2] with static [n, n+2] and scale [n+2], got {tuple(h.shape)}, "
            f"{tuple(static.shape)}, {tuple(scale.shape)}"
        )
    _check_fp32(h=h, static=static, scale=scale)
    p, q, r = hc_gates(h.reshape(-1, n, k_s), static, scale)
    return p.reshape(*lead, n), q.reshape(*lead, n), r.reshape(*lead, n, n)


@torch.library.custom_op(f"{NS}::sinkhorn", mutates_args=())
def sinkhorn(z: torch.Tensor, iters: int) -> torch.Tensor:
    """Logits [T, n, n] fp32 -> doubly stochastic [T, n, n] (columns first, rows last)."""
    return _k().sinkhorn.sinkhorn_fwd(z, iters)


@sinkhorn.register_fake
def _(z, iters):
    return sinkhorn._init_fn(z, iters) if _recording(z) else torch.empty_like(z)


@torch.library.custom_op(f"{NS}::sinkhorn_bwd", mutates_args=())
def sinkhorn_bwd(z: torch.Tensor, g: torch.Tensor, iters: int) -> torch.Tensor:
    return _k().sinkhorn.sinkhorn_bwd(z, g, iters)


@sinkhorn_bwd.register_fake
def _(z, g, iters):
    return sinkhorn_bwd._init_fn(z, g, iters) if _recording(z) else torch.empty_like(z)


def _sinkhorn_setup(ctx, inputs, output):
    ctx.iters = inputs[1]
    ctx.save_for_backward(inputs[0])


def _sinkhorn_backward(ctx, g):
    (z,) = ctx.saved_tensors
    return (sinkhorn_bwd(z, g.contiguous().float(), ctx.iters) if ctx.needs_input_grad[0] else None), None


sinkhorn.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup)


def sinkhorn_knopp(logits, iters: int = 20):
    """[..., n, n] fp32 -> [..., n, n], as `mhc_kernels.sinkhorn_knopp`."""
    lead, n = logits.shape[:-2], logits.shape[-1]
    if logits.shape[-2] != n:
        raise ValueError(f"sinkhorn_knopp expects square [..., n, n] logits, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn_knopp needs iters >= 1, got {iters}")
    _check_fp32(logits=logits)
    return sinkhorn(logits.reshape(-1, n, n), iters).reshape(*lead, n, n)
