"""Single-pass mHC's backward launches (docs/mhc.md section 10): the host side of `single_pass.py`'s backward kernels
(`_sp_write_bwd_kernel`, `_sp_read_bwd_kernel`; their formulas are there, beside the arithmetic).

- `sp_write_bwd(state, y, h_post, g)` -> (dy, dh_post, dH_res): no state gradient, the read's backward writes it.
- `sp_read_bwd(state, phi, h, r, gh, f_grad, g, h_res, ...)` -> (d state, dphi): the site's one state gradient when
  the write hands (g, H_res) over; projection.py's prep kernel, tile plan and token splits, the dphi partials and the
  carried mix's per-channel-block partials summed here.
Callers: `mhc_train/ops/single_pass.py` (eager) and `library_single_pass.py` (the custom ops under torch.compile).
"""

from __future__ import annotations

import torch
import triton

from .single_pass import _sp_read_bwd_kernel, _sp_write_bwd_kernel
from .utils import launch, next_pow2, stream_tile


def sp_write_bwd(state, y, h_post, g):
    """(dy [T, C] in y's dtype, dh_post [T, n], dh_res [T, n, n]) fp32; no gradient of the state (the read's)."""
    T, rows, C = state.shape
    n = rows - 1
    n_pad, bt, bc = stream_tile(n, C)
    dy = torch.empty_like(y)
    dhp = torch.empty(T, n, device=state.device, dtype=torch.float32)
    dhr = torch.empty(T, n, n, device=state.device, dtype=torch.float32)
    launch(
        _sp_write_bwd_kernel,
        (triton.cdiv(T, bt),),
        writes=("dy_ptr", "dhp_ptr", "dhr_ptr"),
        s_ptr=state[:, :n],  # the stream rows of the packed state and of its gradient (same pointers): what is read
        y_ptr=y,
        hp_ptr=h_post,
        g_ptr=g[:, :n],
        dy_ptr=dy,
        dhp_ptr=dhp,
        dhr_ptr=dhr,
        n_tokens=T,
        C=C,
        N=n,
        N_PAD=n_pad,
        BLOCK_T=bt,
        BLOCK_C=bc,
    )
    return dy, dhp, dhr


def sp_read_bwd(state, phi, h, r, gh, f_grad, g=None, h_res=None, write_ds=True, write_dphi=True):
    """(d state [T, n+1, C] or None, dphi [nC, K] or None): the site's one gradient of the packed state when (g,
    h_res) come from the write's backward (the carried mix's gradient in row n: the kernel's per-channel-block
    partials [C blocks, T, n], summed here)."""
    from .projection import _bwd_config, _bwd_prep, _splits

    T, rows, C = state.shape
    n, K = rows - 1, phi.shape[1]
    dproj, s = _bwd_prep(gh, h, r, n, C, 0)
    cfg = _bwd_config(n, C, K)
    c_blocks, k_tiles = triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(K, cfg["BLOCK_K"])
    splits = _splits(T, c_blocks, k_tiles, cfg["BLOCK_T"])
    per_split = triton.cdiv(triton.cdiv(T, splits), cfg["BLOCK_T"]) * cfg["BLOCK_T"]
    ds = torch.empty_like(state) if write_ds else None
    dmix = torch.empty(c_blocks if write_ds else 0, T, n, device=state.device, dtype=torch.float32)
    dphi = torch.empty(splits, n * C, K, device=state.device, dtype=torch.float32) if write_dphi else None
    link = g is not None
    x = state[:, :n]  # views with the packed tensors' pointers: the stream rows and the mix are what is read
    launch(
        _sp_read_bwd_kernel,
        (c_blocks, k_tiles, splits),
        writes=("ds_ptr", "dphi_ptr"),
        s_ptr=x,
        mix_ptr=state[:, n, :n],
        phi_ptr=phi,
        dproj_ptr=dproj,
        sc_ptr=s,
        g_ptr=g[:, :n] if link else x,  # unread placeholders when the term is off (compile-time flags)
        hres_ptr=h_res if link else s,
        fg_ptr=f_grad,
        dmix_ptr=dmix,
        ds_ptr=ds if write_ds else x,
        dphi_ptr=dphi if write_dphi else x,
        n_tokens=T,
        tokens_per_split=per_split,
        C=C,
        K=K,
        N=n,
        N_PAD=next_pow2(n),
        WRITE_DS=write_ds,
        WRITE_DPHI=write_dphi,
        LINK_RES=link,
        ONE_K_TILE=k_tiles == 1 and cfg["BLOCK_K"] >= 32,
        **cfg,
    )
    if write_ds:
        ds[:, n, :n] = dmix.sum(0) if c_blocks > 1 else dmix[0]
    if not write_dphi:
        return ds, None
    return ds, dphi.sum(0) if splits > 1 else dphi[0]
