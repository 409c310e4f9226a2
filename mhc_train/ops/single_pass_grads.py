"""The bodies of single-pass mHC's two backwards (docs/mhc.md section 10), shared by the eager autograd Functions
(`single_pass.py`) and the custom ops under torch.compile (`library_single_pass.py`): each passes in its backward
launch (`mhc_kernels.single_pass_bwd`, or the custom op wrapping it, which AOTAutograd traces) and its ctx.

Axis legend: T tokens, n streams, C channels; the packed state is [T, n + 1, C].
"""

from __future__ import annotations

import torch


def _wanted(ctx) -> tuple[bool, bool]:
    """Whether this backward call needs the state's and phi's gradients: asked of the engine (`ctx.nodes`; a split
    backward calls twice, `library.py`), or `needs_input_grad` where no nodes were kept (a compiled graph)."""
    if ctx.nodes is None:
        return ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return tuple(n is not None and torch._C._will_engine_execute_node(n) for n in ctx.nodes)


def read_grads(bwd, ctx, g_fin, g_h, g_link, hres_link):
    """The read's backward: (d state, dphi), None where not wanted. `bwd`: `mhc_kernels.single_pass_bwd.sp_read_bwd`
    or its op; `ctx` saved (state, phi, h, r); (g_link, hres_link): the write's backward's (g, H_res) through the
    slots, or None (unlinked)."""
    state, phi, h, r = ctx.saved_tensors
    want_ds, want_dphi = _wanted(ctx)
    if not (want_ds or want_dphi) or (g_fin is None and g_h is None and g_link is None):
        return None, None
    T, rows, C = state.shape
    gh = torch.zeros_like(h) if g_h is None else g_h.float().contiguous()
    gf = state.new_zeros(T, C) if g_fin is None else g_fin.contiguous()
    g = h_res = None
    if g_link is not None and want_ds:
        g, h_res = g_link.to(state.dtype).contiguous(), hres_link.float().contiguous()
    ds, dphi = bwd(state, phi, h, r, gh, gf, g, h_res, want_ds, want_dphi)
    return (ds if want_ds else None), (dphi if want_dphi else None)


def write_grads(bwd, ctx, g):
    """The write's backward: (d state, dy, dh_post, dH_res, dmix), and linked (`ctx.linked`)
    no state gradient but the slots' (g, H_res) for the read's backward. `ctx` saved (state, y, h_post, h_res)."""
    state, y, h_post, h_res = ctx.saved_tensors
    n = state.shape[1] - 1
    g = g.contiguous()
    dy, dhp, dhr = bwd(state, y, h_post, g)
    dmix = g[:, n, :n].float()
    if ctx.linked:
        return None, dy, dhp, dhr, dmix, g, h_res
    ds = torch.einsum("tij,tic->tjc", h_res, g[:, :n].float()).to(state.dtype)  # H_res^T g; the mix row's is zero
    return torch.cat([ds, torch.zeros_like(g[:, n:])], 1), dy, dhp, dhr, dmix
