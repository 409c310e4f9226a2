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
  2 * t_max dependent normalisations are 80 dispatches in torch, which no regrouping shortens), else the torch
  backend's one Sinkhorn forward in place (`mhc_train.ops.reference.sinkhorn_forward`);
- HC: the per-stream RMSNorm, one projection and tanh, then one multiply-add by the (s_alpha, s_beta) column scale
  and the static (A_m | B | A_r) block; static HC has no token-dependent part at all, so its coefficients are
  computed once;
- every arm: read `H_pre x` as one batched matmul, write `H_post^T y + H_res x` as one multiply and one in-place
  `baddbmm_`: the `decode` backend of the connection's step (`DecodeBackend`); `mhc_train.ops.SiteStep` runs the
  site (coefficients, pre, F, post_res) as it runs the training site.

The arithmetic is the torch path's (`mhc_train/ops/reference.py`, `connections.HCSite`): the same operations in the
same order, only regrouped over columns; tests/infer check decode against the model's full forward (1e-5, fp32).
`connection.numerics: deepseek_v4` sites decode through `DeepseekDecodeSite` (DeepSeek's ops, not regrouped).
Sites the torch path does not run (the triton backend on CUDA, whose fused kernels already do this) and non-fp32
models keep the model's own `Site.forward`.

Measured per site (demo size, batch 1, process CPU time on a shared 2-core machine): mHC 285 us as the training
site, 42 us here (140 us with the torch Sinkhorn loop), HC 37 us, the residual add 4 us. Counted over the residual's
ops (tests/infer/test_sites.py): ~130 torch ops per training mHC site, 24 here (108 with the torch loop).

A decode site reads the site's parameters when it is built: build a new `Decoder` after changing the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mhc_train.infer.sinkhorn_cpu import native_sinkhorn
from mhc_train.model.connections import HCSite, MHCSite, Site
from mhc_train.ops import SiteStep, TorchBackend
from mhc_train.ops.deepseek import mhc_coefficients_deepseek_ref
from mhc_train.ops.reference import sinkhorn_forward

SubLayer = Callable[[torch.Tensor], torch.Tensor]
Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # h_pre [N, n], h_post [N, n], h_res [N, n, n]


class DecodeBackend(TorchBackend):
    """The `decode` backend of the site step: pre and post_res as batched matmuls over the N = B*T tokens (no autograd,
    no autocast region: decode runs fp32 under no_grad)."""

    name = "decode"

    def coefficient_region(self, x):
        return contextlib.nullcontext()

    def pre(self, x, h_pre, link=None):
        B, T, n, C = x.shape
        return torch.bmm(h_pre.unsqueeze(1), x.reshape(B * T, n, C)).view(B, T, C)  # F's input H_pre x: [B, T, C]

    def post_res(self, x, y, h_post, h_res, link=None):
        B, T, n, C = x.shape
        xs = x.reshape(B * T, n, C)  # [N, n, C]
        out = h_post.unsqueeze(-1) * y.reshape(B * T, 1, C)  # H_post^T y: [N, n, C]
        out = out.add_(xs) if h_res is None else out.baddbmm_(h_res, xs)  # + H_res x (left-multiplied)
        return out.view(B, T, n, C)


DECODE_STEP = SiteStep(DecodeBackend())


class DecodeSite:
    """`site(x, sublayer)` for x [B, T, n, C] fp32: `H_res x + H_post^T F(H_pre x)` from `coefficients(x)`, run by the
    connection's step on the decode backend."""

    def coefficients(self, x: torch.Tensor, kernels=None) -> Coefficients:
        """x [B, T, n, C] -> h_pre [N, n], h_post [N, n], h_res [N, n, n] | None (the step's coefficient function)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sublayer: SubLayer) -> torch.Tensor:
        out, _ = DECODE_STEP(self.coefficients, x, sublayer)
        return out


class MHCDecodeSite(DecodeSite):
    """mHC (`MHCSite`): gates and biases as per-column vectors, H_pre and H_post from one sigmoid, Sinkhorn as the C
    loop (`native`, on CPU) or the torch backend's forward in place."""

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

    def coefficients(self, x, kernels=None):
        n = self.n
        v = x.reshape(-1, n * x.shape[-1])  # [N, nC]
        h = torch.mm(v, self.phi)  # [N, K]; then the reordered RMSNorm of `mhc_projection_ref`, in place:
        h.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[1]).add_(self.eps).sqrt_())
        logits = h.mul_(self.gate).add_(self.bias)  # [N, K]
        gates = torch.sigmoid(logits[:, : 2 * n]).mul_(self.read_write_scale)  # [N, 2n]: H_pre | H_post
        if self.identity_res:
            return gates[:, :n], gates[:, n:], None
        res = logits[:, 2 * n :].view(-1, n, n)  # [N, n, n], row-major
        if self.native_sinkhorn is not None:
            return gates[:, :n], gates[:, n:], self.native_sinkhorn(res, self.iters)
        return gates[:, :n], gates[:, n:], sinkhorn_forward(res, self.iters, inplace=True)


class DeepseekDecodeSite(DecodeSite):
    """mHC with `connection.numerics: deepseek_v4`: DeepSeek's arithmetic (`ops/deepseek.py`) on the N new tokens,
    the parameters read once (no autograd). Not regrouped like `MHCDecodeSite`: the same ops as the training site."""

    def __init__(self, site: MHCSite):
        cfg = site.cfg
        self.n, self.iters, self.eps, self.hc_eps = site.n, cfg.t_max, cfg.eps, cfg.hc_eps
        self.phi, self.alpha, self.bias = (p.detach().float() for p in (site.phi, site.alpha, site.bias))

    def coefficients(self, x, kernels=None):
        xs = x.reshape(-1, *x.shape[-2:])  # [N, n, C]
        return mhc_coefficients_deepseek_ref(xs, self.phi, self.alpha, self.bias, self.iters, self.eps, self.hc_eps)


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

    def coefficients(self, x, kernels=None):
        if not self.dynamic:
            h_pre, h_post, h_res = self.fixed
            N = x.shape[0] * x.shape[1]
            return h_pre.expand(N, -1), h_post.expand(N, -1), h_res.expand(N, -1, -1)
        xs = x.reshape(-1, *x.shape[-2:])  # [N, n, C]
        d = torch.tanh((xs @ self.proj) * torch.rsqrt(xs.square().mean(-1, keepdim=True) + self.eps))  # [N, n, n+2]
        return self._split(d.mul_(self.scale).add_(self.static))


def decode_site(site: Site, native: bool = True) -> Site | DecodeSite:
    """The decode path of `site`: a `DecodeSite` where the torch backend runs an fp32 site, else the site itself (the
    residual site's `x + F(x)` is already minimal; the triton backend's kernels are fused). `native`: mHC's Sinkhorn
    as the C loop on CPU where it builds (False: torch ops only)."""
    if getattr(site, "lagged", False):  # single-pass mHC: its own forward carries the mix (model/single_pass.py)
        return site
    params = list(site.parameters())
    if not params or params[0].dtype != torch.float32 or site.step.backend(params[0].device).name != "torch":
        return site
    with torch.no_grad():
        if isinstance(site, MHCSite) and getattr(site.cfg, "numerics", "paper") == "deepseek_v4":
            return DeepseekDecodeSite(site)
        if isinstance(site, MHCSite):
            return MHCDecodeSite(site, native)
        if isinstance(site, HCSite):
            return HCDecodeSite(site)
    return site
