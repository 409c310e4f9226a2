"""Single-pass mHC across a sub-layer boundary (docs/mhc.md section 10): site l's write fused with site l+1's read.

One kernel, `sp_write_read_fwd`, reads x_l (n rows of the packed state), F_l's output y and site l's coefficients once
and writes, per token:
- the next packed state [n + 1, C]: x_{l+1} = H_res x_l + h_post (x) y on rows 0..n-1, the next mix (site l's H_pre) on
  row n (its first n channels; zeros after), exactly as `single_pass.sp_write_fwd`;
- F_{l+1}'s input m . x_{l+1}, the projection h = (vec(x_{l+1}) @ phi_{l+1}) / r and r, exactly as
  `single_pass.sp_read_fwd` would compute them from the state just written (site l+1's phi passed in).

Notable choices:
- Bit-identical to the unfused pair (tested in the interpreter): the row step (`single_pass._read_row`) is the read
  kernel's own @triton.jit helper, and the tiles, the grid (token blocks x K tiles), the
  channel-block-outside / stream-inside loop order and the launch options are the read kernel's (`_read_config`), each
  x_{l+1} element is accumulated in the write kernel's order (h_post y first, then input streams 0..n-1), and the
  projection, the RMS statistics and F's input are taken from x_{l+1} rounded to the state's dtype, as the read
  kernel loads it. So a recompute replay or a pipeline stage's last site, which run the unfused pair, give the same
  bits as the fused model.
- Each output row j re-reads the n input rows of its channel block (n^2 tile loads per block, served from L1/L2:
  DRAM reads x_l once); the K-tile-0 programs store the state and F's input, every K tile its columns of h (for
  n <= 10 there is one K tile on the GPU, so x_l is read once).
- The launcher passes the packed state's stream rows as a view `state[:, :n]` (the kernel reads n rows; the mix row of
  the input is not read), so the traffic audit counts nC there, not (n + 1)C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .single_pass import _read_config, _read_row
from .utils import launch


@triton.jit(do_not_specialize=["n_tokens"])
def _sp_write_read_fwd_kernel(
    x_ptr,
    y_ptr,
    hp_ptr,
    hr_ptr,
    mix_ptr,
    phi_ptr,
    out_ptr,
    fin_ptr,
    h_ptr,
    r_ptr,
    n_tokens,
    C,
    K,
    eps,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mt, mk = offs_t < n_tokens, offs_k < K
    S = (N + 1) * C  # a token's row of the packed state (input and output)
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        m_tc = mt[:, None] & mc[None, :]
        y = tl.load(y_ptr + offs_t[:, None] * C + offs_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        fin = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for j in range(0, N):  # output stream j of x_{l+1}: the write kernel's sum, in its order
            hpj = tl.load(hp_ptr + offs_t * N + j, mask=mt, other=0.0)
            o = hpj[:, None] * y
            for i in range(0, N):
                xi = tl.load(x_ptr + offs_t[:, None] * S + i * C + offs_c[None, :], mask=m_tc, other=0.0)
                hji = tl.load(hr_ptr + offs_t * (N * N) + j * N + i, mask=mt, other=0.0)
                o += hji[:, None] * xi.to(tl.float32)
            o = o.to(out_ptr.dtype.element_ty)
            if pid_k == 0:
                tl.store(out_ptr + offs_t[:, None] * S + j * C + offs_c[None, :], o, mask=m_tc)
            # the next site's read of x_{l+1} as stored: the read kernel's projection, statistics and F_in
            mj = tl.load(mix_ptr + offs_t * N + j, mask=mt, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
            acc, ss, fin = _read_row(o.to(tl.float32), mj, j * C + offs_c, mc, offs_k, mk, phi_ptr, K, acc, ss, fin)
        if pid_k == 0:
            tl.store(fin_ptr + offs_t[:, None] * C + offs_c[None, :], fin.to(fin_ptr.dtype.element_ty), mask=m_tc)
            # row n: the next mix in its first n channels, zeros after (the write kernel's row)
            mix = tl.load(mix_ptr + offs_t[:, None] * N + offs_c[None, :], mask=mt[:, None] & (offs_c < N)[None, :])
            mix = tl.where(mt[:, None] & (offs_c < N)[None, :], mix, 0.0)
            tl.store(
                out_ptr + offs_t[:, None] * S + N * C + offs_c[None, :], mix.to(out_ptr.dtype.element_ty), mask=m_tc
            )
    r = tl.sqrt(ss / (N * C) + eps)
    acc = acc / r[:, None]
    if pid_k == 0:
        tl.store(r_ptr + offs_t, r, mask=mt)
    tl.store(h_ptr + offs_t[:, None] * K + offs_k[None, :], acc, mask=mt[:, None] & mk[None, :])


def sp_write_read_fwd(state, y, h_post, h_res, mix, phi_next, eps: float):
    """state [T, n+1, C], y [T, C], h_post [T, n], h_res [T, n, n], mix [T, n] fp32, phi_next [nC, K] fp32 ->
    (the next state [T, n+1, C], F_in [T, C] in the state's dtype, h [T, K] fp32, r [T] fp32): `sp_write_fwd`
    followed by `sp_read_fwd` of its output, in one pass and with the same bits."""
    T, rows, C = state.shape
    n, K = rows - 1, phi_next.shape[1]
    out = torch.empty_like(state)
    f_in = torch.empty(T, C, device=state.device, dtype=state.dtype)
    h = torch.empty(T, K, device=state.device, dtype=torch.float32)
    r = torch.empty(T, device=state.device, dtype=torch.float32)
    cfg = _read_config(n, C, K)
    launch(
        _sp_write_read_fwd_kernel,
        (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(K, cfg["BLOCK_K"])),
        writes=("out_ptr", "fin_ptr", "h_ptr", "r_ptr"),
        x_ptr=state[:, :n],  # the stream rows (same pointer; the audit counts what is read)
        y_ptr=y,
        hp_ptr=h_post,
        hr_ptr=h_res,
        mix_ptr=mix,
        phi_ptr=phi_next,
        out_ptr=out,
        fin_ptr=f_in,
        h_ptr=h,
        r_ptr=r,
        n_tokens=T,
        C=C,
        K=K,
        eps=eps,
        N=n,
        **cfg,
    )
    return out, f_in, h, r
