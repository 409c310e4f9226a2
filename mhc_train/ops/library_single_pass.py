"""The single-pass arm's kernels as `torch.library` custom ops (namespace `mhc_train`), for torch.compile: a compiled
block traces them through their fakes, with no graph break at a site (the arm's eager path, `ops/single_pass.py`,
runs autograd Functions with Python state: the cross-site prefetch, which compile does not take).

Axis legend: T tokens, n streams, C channels, K coefficient columns; the packed state is [T, n + 1, C].

- `sp_read(state, phi, eps)` -> (F_in, h, r, g slot, H_res slot): the read pass and the site's link slots
  (`library.py`'s scheme): `sp_write_linked` takes the two slots, and its backward returns (g, H_res) as their
  gradients, so the read's backward writes the state's one gradient in its kernel.
- `sp_write(state, y, h_post, h_res, mix)` (unlinked: its backward writes H_res^T g itself) and `sp_write_linked`.
- The backwards are ops of their own (`sp_read_bwd`, `sp_write_bwd`), so AOTAutograd traces them too. Split
  backwards: eager asks the engine which of state and phi a call needs (as `SinglePassRead` does); compiled graphs
  use `needs_input_grad`.
"""

from __future__ import annotations

import torch

from .library import NS, _eager, _empty, _own_node, _recording, _slot
from .single_pass_grads import read_grads, write_grads


def _read_slots(state: torch.Tensor):
    T, rows, C = state.shape
    return _slot(state, T, rows, C, dtype=state.dtype), _slot(state, T, rows - 1, rows - 1)


@torch.library.custom_op(f"{NS}::sp_read", mutates_args=())
def sp_read(
    state: torch.Tensor, phi: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """state [T, n+1, C], phi [nC, K] fp32 -> (F_in [T, C], h [T, K], r [T], g slot, H_res slot)."""
    from mhc_kernels.single_pass import sp_read_fwd

    return *sp_read_fwd(state, phi, eps), *_read_slots(state)


@sp_read.register_fake
def _(state, phi, eps):
    if _recording(state):
        return sp_read._init_fn(state, phi, eps)
    T, rows, C = state.shape
    f32 = torch.float32
    f_in, h, r = state.new_empty(T, C), state.new_empty(T, phi.shape[1], dtype=f32), state.new_empty(T, dtype=f32)
    return f_in, h, r, *_read_slots(state)


@torch.library.custom_op(f"{NS}::sp_read_bwd", mutates_args=())
def sp_read_bwd(
    state: torch.Tensor,
    phi: torch.Tensor,
    h: torch.Tensor,
    r: torch.Tensor,
    gh: torch.Tensor,
    f_grad: torch.Tensor,
    g: torch.Tensor | None,
    h_res: torch.Tensor | None,
    want_ds: bool,
    want_dphi: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d state [T, n+1, C] or empty, dphi [nC, K] or empty): `single_pass.sp_read_bwd`."""
    from mhc_kernels.single_pass_bwd import sp_read_bwd as bwd

    ds, dphi = bwd(state, phi, h, r, gh, f_grad, g, h_res, want_ds, want_dphi)
    return (ds if want_ds else _empty(state)), (dphi if want_dphi else _empty(phi))


@sp_read_bwd.register_fake
def _(state, phi, h, r, gh, f_grad, g, h_res, want_ds, want_dphi):
    if _recording(state):
        return sp_read_bwd._init_fn(state, phi, h, r, gh, f_grad, g, h_res, want_ds, want_dphi)
    return (torch.empty_like(state) if want_ds else _empty(state)), (
        torch.empty_like(phi) if want_dphi else _empty(phi)
    )


def _read_setup(ctx, inputs, output):
    state, phi, _eps = inputs
    ctx.save_for_backward(state, phi, output[1], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.nodes = [t.grad_fn if t.requires_grad else None for t in (state, phi)] if _eager() else None


def _read_backward(ctx, g_fin, g_h, _r, g_link, hres_link):
    return *read_grads(sp_read_bwd, ctx, g_fin, g_h, g_link, hres_link), None


sp_read.register_autograd(_read_backward, setup_context=_read_setup)


@torch.library.custom_op(f"{NS}::sp_write", mutates_args=())
def sp_write(
    state: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """The next packed state [T, n+1, C] (`single_pass.sp_write_fwd`)."""
    from mhc_kernels.single_pass import sp_write_fwd

    return sp_write_fwd(state, y, h_post, h_res, mix)


@sp_write.register_fake
def _(state, y, h_post, h_res, mix):
    if _recording(state):
        return sp_write._init_fn(state, y, h_post, h_res, mix)
    return torch.empty_like(state)


@torch.library.custom_op(f"{NS}::sp_write_linked", mutates_args=())
def sp_write_linked(
    state: torch.Tensor,
    y: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    mix: torch.Tensor,
    g_slot: torch.Tensor,
    hres_slot: torch.Tensor,
) -> torch.Tensor:
    """`sp_write` taking the read's slots: its backward hands (g, H_res) to the read's."""
    from mhc_kernels.single_pass import sp_write_fwd

    return sp_write_fwd(state, y, h_post, h_res, mix)


@sp_write_linked.register_fake
def _(state, y, h_post, h_res, mix, g_slot, hres_slot):
    if _recording(state):
        return sp_write_linked._init_fn(state, y, h_post, h_res, mix, g_slot, hres_slot)
    return torch.empty_like(state)


@torch.library.custom_op(f"{NS}::sp_write_bwd", mutates_args=())
def sp_write_bwd(
    state: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dh_post, dH_res) (`single_pass.sp_write_bwd`)."""
    from mhc_kernels.single_pass_bwd import sp_write_bwd as bwd

    return bwd(state, y, h_post, g)


@sp_write_bwd.register_fake
def _(state, y, h_post, g):
    if _recording(state):
        return sp_write_bwd._init_fn(state, y, h_post, g)
    T, rows, _ = state.shape
    f32 = torch.float32
    return (
        torch.empty_like(y),
        state.new_empty(T, rows - 1, dtype=f32),
        state.new_empty(T, rows - 1, rows - 1, dtype=f32),
    )


def _write_setup(ctx, inputs, output):
    state, y, h_post, h_res = inputs[:4]
    ctx.linked = len(inputs) > 5
    ctx.save_for_backward(state, y, h_post, h_res)


def _write_backward(ctx, g):
    return write_grads(sp_write_bwd, ctx, g)


sp_write.register_autograd(_write_backward, setup_context=_write_setup)
sp_write_linked.register_autograd(_write_backward, setup_context=_write_setup)


def read(state: torch.Tensor, phi: torch.Tensor, eps: float):
    """(F_in, h, link slots) of state [T, n+1, C] (contiguous) and phi [nC, K] fp32."""
    f_in, h, _r, *slots = sp_read(_own_node(state), _own_node(phi), eps)
    return f_in, h, tuple(slots)


def write(state, y, h_post, h_res, mix, link=None) -> torch.Tensor:
    """The next packed state; `link`: the slots `read` returned (None: unlinked)."""
    if link is None:
        return sp_write(state, y, h_post, h_res, mix)
    return sp_write_linked(state, y, h_post, h_res, mix, *link)
