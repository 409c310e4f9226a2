"""Connection sites for decode: each site's math for the new tokens in a few ops, its token-free parts precomputed.

Axis legend: B batch, T new tokens, N = B*T tokens, n streams, C channels, K coefficient columns.

Why a second path: a decode step feeds one token per row, so every op of a connection site touches a few hundred
numbers and costs its dispatch (a few microseconds on CPU), not its arithmetic. Profiled at the demo size (batch 1),
the training site (`Site.forward` through `mhc_train.ops`) spent about 300 us per mHC site: the Sinkhorn autograd
Function (its token-last copies, 80 out-of-place iterate ops), the coefficient path's casts, slices, expands and
autocast region, and `mhc_post_res`'s separate matmul, multiply and add. Here, per site and step:
- mHC: one projection (`mhc_projection_ref`'s ops: the matmul, then the reordered RMSNorm in place), one
  multiply-add by the per-column gate and bias vectors (built once from alpha and the bias), one sigmoid scaled by
  (1, .., 1, 2, .., 2) for H_pre and H_post together, and Sinkhorn as one C call on CPU (`sinkhorn_cpu.py`: its
  2 * t_max dependent normalisations are 80 dispatches in torch, which no regrouping shortens), else in place on
  preallocated sums (`sinkhorn_`);
- HC: the per-stream RMSNorm, one projection and tanh, then one multiply-add by the (s_alpha, s_beta) column scale
  and the static (A_m | B | A_r) block; static HC has no token-dependent part at all, so its coefficients are
  computed once;
- every arm: read `H_pre x` as one batched matmul, write `H_post^T y + H_res x` as one multiply and one in-place
  `baddbmm_`.

The arithmetic is the torch path's (`mhc_train/ops/reference.py`, `connections.HCSite`): the same operations in the
same order, only regrouped over columns; tests/infer check decode against the model's full forward (1e-5, fp32).
Sites the torch path does not run (the triton backend on CUDA, whose fused kernels already do this) and non-fp32
models keep the model's own `Site.forward`.

Measured per site (demo size, batch 1, process CPU time on a shared 2-core machine): mHC 285 us as the training
site, 42 us here (140 us with the torch Sinkhorn loop), HC 37 us, the residual add 4 us. Counted over the residual's
ops (tests/infer/test_decode_sites.py): ~130 torch ops per training mHC site, 24 here (108 with the torch loop).

A decode site reads the site's parameters when it is built: build a new `Decoder` after changing the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mhc_train.infer.sinkhorn_cpu import native_sinkhorn
from mhc_train.model.connections import HCSite, MHCSite, Site
from mhc_train.ops import resolve_backend

SubLayer = Callable[[torch.Tensor], torch.Tensor]
Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # h_pre [N, n], h_post [N, n], h_res [N, n, n]


def sinkhorn_(m: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp iterations on `m` [N, n, n] = exp(logits - max) in place (columns first, rows last); returns m.

    The iterates of `sinkhorn_knopp_ref`, with the sums written into two preallocated buffers and the divisions done
    in place: no tensor is allocated inside the loop.
    """
    cols, rows = m.new_empty(m.shape[0], 1, m.shape[2]), m.new_empty(m.shape[0], m.shape[1], 1)
    for _ in range(iters):
        m.div_(torch.sum(m, dim=-2, keepdim=True, out=cols))  # columns first
        m.div_(torch.sum(m, dim=-1, keepdim=True, out=rows))  # rows last
    return m


class DecodeSite:
    """`site(x, sublayer)` for x [B, T, n, C] fp32: `H_res x + H_post^T F(H_pre x)` from `coefficients(x)`."""

    def coefficients(self, xs: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sublayer: SubLayer) -> torch.Tensor:
        B, T, n, C = x.shape
        xs = x.reshape(B * T, n, C)  # [N, n, C]
        h_pre, h_post, h_res = self.coefficients(xs)
        y = sublayer(torch.bmm(h_pre.unsqueeze(1), xs).view(B, T, C))  # F(H_pre x): [B, T, C]
        out = h_post.unsqueeze(-1) * y.reshape(B * T, 1, C)  # H_post^T y: [N, n, C]
        out = out.add_(xs) if h_res is None else out.baddbmm_(h_res, xs)  # + H_res x (left-multiplied)
        return out.view(B, T, n, C)


class MHCDecodeSite(DecodeSite):
    """mHC (`MHCSite`): gates and biases as per-column vectors, H_pre and H_post from one sigmoid, Sinkhorn as the C
    loop (`native`, on CPU) or in place (`sinkhorn_`)."""

    def __init__(self, site: MHCSite, native: bool = True):
        n, cfg = site.n, site.cfg
        self.n, self.iters, self.eps, self.identity_res = n, cfg.t_max, cfg.eps, site.identity_res
        self.phi = site.phi.detach().float()  # [nC, K], the RMSNorm gain folded in
        blocks = torch.tensor([n, n] if self.identity_res else [n, n, n * n], device=self.phi.device)
        self.gate = site.alpha.detach().float().repeat_interleave(blocks)  # [K]: alpha (pre, post, res) per column
        self.bias = site.bias.detach().float().clone()  # [K]
        self.read_write_scale = torch.ones(2 * n, device=self.phi.device)  # H_pre = sigmoid, H_post = 2 sigmoid
        self.read_write_scale[n:] = 2.0
        on_cpu = self.phi.device.type == "cpu"
        self.native_sinkhorn = native_sinkhorn() if native and on_cpu and not self.identity_res else None

    def coefficients(self, xs):
        n = self.n
        v = xs.view(xs.shape[0], -1)  # [N, nC]
        h = torch.mm(v, self.phi)  # [N, K]; then the reordered RMSNorm of `mhc_projection_ref`, in place:
        h.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[1]).add_(self.eps).sqrt_())
        logits = h.mul_(self.gate).add_(self.bias)  # [N, K]
        gates = torch.sigmoid(logits[:, : 2 * n]).mul_(self.read_write_scale)  # [N, 2n]: H_pre | H_post
        if self.identity_res:
            return gates[:, :n], gates[:, n:], None
        res = logits[:, 2 * n :].view(-1, n, n)  # [N, n, n], row-major
        if self.native_sinkhorn is not None:
            return gates[:, :n], gates[:, n:], self.native_sinkhorn(res, self.iters)
        m = torch.exp(res - res.amax(dim=(-2, -1), keepdim=True))  # the shift is exact (Sinkhorn ignores scalings)
        return gates[:, :n], gates[:, n:], sinkhorn_(m, self.iters)


class HCDecodeSite(DecodeSite):
    """HC (`HCSite`): row j of the block [N, n, n+2] is (A_m[j], B[j], A_r[j, :]) = static + scale * tanh(...)."""

    def __init__(self, site: HCSite):
        n = site.n
        static = [site.static_alpha_m.detach()[:, None], site.static_beta.detach()[:, None], site.static_alpha_r]
        self.static = torch.cat([t.detach().float() for t in static], dim=1)  # [n, n+2]
        self.dynamic, self.eps = site.dynamic, site.eps
        if self.dynamic:
            # [C, n+2], columns [W_m | W_b | W_r], the norm's gain folded in as HCSite does
            self.proj = site.norm_weight.detach().float()[:, None] * site.dyn_proj.detach().float()
            s_alpha, s_beta = site.dyn_scale.detach().float().unbind()
            self.scale = torch.cat([s_alpha[None], s_beta[None], s_alpha.expand(n)])  # [n+2]
        else:  # static HC: the coefficients do not depend on the token
            self.fixed = self._split(self.static.unsqueeze(0))

    @staticmethod
    def _split(block: torch.Tensor) -> Coefficients:
        return block[..., 0], block[..., 1], block[..., 2:].transpose(-1, -2)  # h_res = A_r^T

    def coefficients(self, xs):
        if not self.dynamic:
            h_pre, h_post, h_res = self.fixed
            N = xs.shape[0]
            return h_pre.expand(N, -1), h_post.expand(N, -1), h_res.expand(N, -1, -1)
        d = torch.tanh((xs @ self.proj) * torch.rsqrt(xs.square().mean(-1, keepdim=True) + self.eps))  # [N, n, n+2]
        return self._split(d.mul_(self.scale).add_(self.static))


def decode_site(site: Site, native: bool = True) -> Site | DecodeSite:
    """The decode path of `site`: a `DecodeSite` where the torch backend runs an fp32 site, else the site itself (the
    residual site's `x + F(x)` is already minimal; the triton backend's kernels are fused). `native`: mHC's Sinkhorn
    as the C loop on CPU where it builds (False: torch ops only)."""
    params = list(site.parameters())
    if not params or params[0].dtype != torch.float32 or resolve_backend(site.backend, params[0].device) != "torch":
        return site
    with torch.no_grad():
        if isinstance(site, MHCSite):
            return MHCDecodeSite(site, native)
        if isinstance(site, HCSite):
            return HCDecodeSite(site)
    return site
