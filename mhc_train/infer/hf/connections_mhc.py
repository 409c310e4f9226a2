"""The connection sites of an mhc-train export: residual, HC, mHC (paper or DeepSeek-V4 numerics) and single-pass
mHC, and the final collapses (sum, mean, learned, the single-pass mix), for `modeling_mhc.py`.

Needs only torch (copied by `mhc-train export`). The math is mhc-train's torch path line for line
(`mhc_train/model/connections.py`, `model/single_pass.py`, `ops/reference.py`, `ops/deepseek.py`); tests/infer check
the logits against mhc-train's model (fp32, 1e-5).

Axis legend: B batch, T time, n streams, C channels, N = B*T tokens, K = n*n + 2n coefficient columns.

- Every site maps `x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)`, H_res left-multiplied (new stream i =
  sum_j H_res[i, j] x_j). mHC: coefficients from the RMS-normalised nC vector, gates alpha (pre, post, res), biases,
  sigmoid, 2 sigmoid and Sinkhorn. `numerics: paper`: the reordered norm (divide after the matmul) and Sinkhorn from
  exp (columns first, rows last, t_max pairs). `numerics: deepseek_v4` (docs/mhc.md section 8): the norm first, H_pre
  + hc_eps, and DeepSeek's Sinkhorn (softmax over our columns + hc_eps, then rows, then t_max - 1 (columns, rows)
  rounds, `+ hc_eps` in every denominator): `sinkhorn_deepseek` is `ops/deepseek.py`'s arithmetic unchanged.
- Single-pass (`mhc_single_pass`, docs/mhc.md section 10): the state is [B, T, n + 1, C], row n carrying the read
  mix in its first n channels (e_0 at the embedding); a site reads x_l with the carried mix, computes its
  coefficients from x_l and packs its own H_pre as the next site's mix; the collapse is the carried mix's read.
- Collapses (`connection.collapse`, docs/mhc.md section 9): sum, mean, or DeepSeek-V4's learned head
  (`collapse_conn.weight` [nC, n], `.bias` [n], `.scale` [1]).
- Under `no_grad` in fp32 the HC and paper-mHC sites run mhc-train generate's regrouped decode math
  (`decode_coefficients`, `decode_site`; Sinkhorn as torch ops in place); with autograd, the plain math. Both are
  tested equal. DeepSeek numerics and single-pass sites run their plain math in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ---- connection math (mhc_train/ops/reference.py, torch path) ----------------------------------------------------
def sinkhorn_knopp(logits, iters):
    z = logits.float()
    m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # columns first
        m = m / m.sum(dim=-1, keepdim=True)  # rows last
    return m


def mhc_coefficients(x, phi, alpha, bias, iters, eps):
    n = x.shape[-2]
    v = x.flatten(-2).float()  # [..., nC]
    proj = v @ phi.float()
    ms = torch.linalg.vector_norm(v, dim=-1, keepdim=True).square() / v.shape[-1]
    h = proj / torch.sqrt(ms + eps)  # reordered RMSNorm (Eqs. 14-16)
    alpha, bias = alpha.float(), bias.float()
    h_pre = torch.sigmoid(alpha[0] * h[..., :n] + bias[:n])
    h_post = 2.0 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + bias[n : 2 * n])
    if phi.shape[1] == 2 * n:  # identity H_res
        return h_pre, h_post, None
    res_logits = (alpha[2] * h[..., 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n))  # row-major n x n
    return h_pre, h_post, sinkhorn_knopp(res_logits, iters)


# ---- DeepSeek-V4's arithmetic (mhc_train/ops/deepseek.py; connection.numerics: deepseek_v4) ------------------------
def sinkhorn_deepseek(logits, iters, eps):
    """DeepSeek-V4's Sinkhorn in our frame (mhc_train/ops/deepseek.py, `sinkhorn_deepseek_ref`): logits [..., n, n]."""
    m = torch.softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), dim=-2) + eps
    m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows (their columns)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns (their rows)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows (their columns)
    return m


def rms_projection(x, weight, eps):
    """`(vec(x) * rsqrt(mean(vec(x)^2) + eps)) @ weight`, DeepSeek's order (the norm first). x [..., n, C]."""
    v = x.flatten(-2).float()  # [..., nC]
    return (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)) @ weight.float()


def mhc_coefficients_deepseek(x, phi, alpha, bias, iters, eps, hc_eps):
    """(h_pre, h_post, h_res) with DeepSeek-V4's arithmetic (mhc_train/ops/deepseek.py)."""
    n = x.shape[-2]
    h = rms_projection(x, phi, eps)  # [..., K]
    alpha, bias = alpha.float(), bias.float()
    h_pre = torch.sigmoid(h[..., :n] * alpha[0] + bias[:n]) + hc_eps
    h_post = 2 * torch.sigmoid(h[..., n : 2 * n] * alpha[1] + bias[n : 2 * n])
    res_logits = (h[..., 2 * n :] * alpha[2] + bias[2 * n :]).unflatten(-1, (n, n))  # [..., n, n] our frame
    return h_pre, h_post, sinkhorn_deepseek(res_logits, iters, hc_eps)


def mhc_pre(x, h_pre):
    return (h_pre.float().unsqueeze(-2) @ x.float()).squeeze(-2).to(x.dtype)  # [..., C]


def mhc_post_res(x, y, h_post, h_res):
    xc, yc = x.float(), y.float()
    mixed = xc if h_res is None else h_res.float() @ xc  # sum_j H_res[i, j] x_j
    return (mixed + h_post.float().unsqueeze(-1) * yc.unsqueeze(-2)).to(x.dtype)


# ---- decode: the same math regrouped into a few ops per site (mhc_train/infer/sites.py, without its C Sinkhorn) ----
def decoding(x):
    """Inference in fp32 (no autograd): the sites take their regrouped path; training keeps the plain math above."""
    return not torch.is_grad_enabled() and x.dtype == torch.float32


def decode_site(x, sublayer, h_pre, h_post, h_res):
    """`H_res x + H_post^T F(H_pre x)` over N = B*T tokens: the read as one bmm, the write as one multiply and one
    in-place baddbmm. h_pre, h_post [N, n], h_res [N, n, n] or None (identity)."""
    B, T, n, C = x.shape
    xs = x.reshape(B * T, n, C)  # [N, n, C]
    y = sublayer(torch.bmm(h_pre.unsqueeze(1), xs).view(B, T, C))  # F(H_pre x): [B, T, C]
    out = h_post.unsqueeze(-1) * y.reshape(B * T, 1, C)  # H_post^T y: [N, n, C]
    out = out.add_(xs) if h_res is None else out.baddbmm_(h_res, xs)
    return out.view(B, T, n, C)


def versions(*params):
    return tuple((p._version, p.device) for p in params)


class ResidualSite(nn.Module):
    def forward(self, x, sublayer):
        return x + sublayer(x.squeeze(-2)).unsqueeze(-2)


class HCSite(nn.Module):
    def __init__(self, dim, n, conn):
        super().__init__()
        self.n, self.dynamic, self.eps = n, conn.get("hc_dynamic", True), conn.get("eps", 1e-6)
        self.static_beta = nn.Parameter(torch.ones(n))
        self.static_alpha_m = nn.Parameter(torch.zeros(n))
        self.static_alpha_r = nn.Parameter(torch.eye(n))
        if self.dynamic:
            self.norm_weight = nn.Parameter(torch.ones(dim))
            self.dyn_proj = nn.Parameter(torch.zeros(dim, n + 2))  # [W_m | W_b | W_r (n)]
            self.dyn_scale = nn.Parameter(torch.zeros(2))  # (s_alpha, s_beta)

    def coefficients(self, x):
        n, lead = self.n, x.shape[:-2]
        a_m = self.static_alpha_m.float().expand(*lead, n)
        beta = self.static_beta.float().expand(*lead, n)
        a_r = self.static_alpha_r.float().expand(*lead, n, n)
        if self.dynamic:
            xf = x.float()
            xn = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
            d = torch.tanh(xn @ self.dyn_proj.float())  # [B, T, n, n+2]
            s_alpha, s_beta = self.dyn_scale.float().unbind()
            a_m = a_m + s_alpha * d[..., 0]
            beta = beta + s_beta * d[..., 1]
            a_r = a_r + s_alpha * d[..., 2:]
        return a_m, beta, a_r.transpose(-1, -2)

    def decode_coefficients(self, x):
        """HC's coefficients for decode: row j of [N, n, n+2] is (A_m[j], B[j], A_r[j, :]) = static + scale * tanh."""
        params = [self.static_alpha_m, self.static_beta, self.static_alpha_r]
        if self.dynamic:
            params += [self.norm_weight, self.dyn_proj, self.dyn_scale]
        if getattr(self, "_decode_key", None) != versions(*params):  # built once per weights
            static = torch.cat([self.static_alpha_m[:, None], self.static_beta[:, None], self.static_alpha_r], 1)
            self._static = static.float()  # [n, n+2]
            if self.dynamic:
                self._proj = self.norm_weight.float()[:, None] * self.dyn_proj.float()  # the norm's gain folded in
                s_alpha, s_beta = self.dyn_scale.float().unbind()
                self._scale = torch.cat([s_alpha[None], s_beta[None], s_alpha.expand(self.n)])  # [n+2]
            self._decode_key = versions(*params)
        N = x.shape[0] * x.shape[1]
        if self.dynamic:
            xs = x.reshape(N, *x.shape[-2:])  # [N, n, C]
            d = torch.tanh((xs @ self._proj) * torch.rsqrt(xs.square().mean(-1, keepdim=True) + self.eps))
            block = d.mul_(self._scale).add_(self._static)  # [N, n, n+2]
        else:
            block = self._static.expand(N, -1, -1)
        return block[..., 0], block[..., 1], block[..., 2:].transpose(-1, -2)

    def forward(self, x, sublayer):
        if decoding(x):
            return decode_site(x, sublayer, *self.decode_coefficients(x))
        h_pre, h_post, h_res = self.coefficients(x)
        return mhc_post_res(x, sublayer(mhc_pre(x, h_pre)), h_post, h_res)


class MHCSite(nn.Module):
    def __init__(self, dim, n, conn):
        super().__init__()
        self.n, self.iters, self.eps = n, conn.get("t_max", 20), conn.get("eps", 1e-6)
        self.deepseek, self.hc_eps = conn.get("numerics", "paper") == "deepseek_v4", conn.get("hc_eps", 1e-6)
        k = 2 * n if conn.get("h_res", "sinkhorn") == "identity" else n * n + 2 * n
        self.phi = nn.Parameter(torch.zeros(n * dim, k))
        self.alpha = nn.Parameter(torch.zeros(2 if k == 2 * n else 3))
        self.bias = nn.Parameter(torch.zeros(k))

    def decode_coefficients(self, x):
        """mHC's coefficients for decode: one projection, the reordered RMSNorm in place, one multiply-add by the
        per-column gates and biases, one sigmoid scaled (1 | 2) for H_pre and H_post, Sinkhorn in place."""
        n = self.n
        if getattr(self, "_decode_key", None) != versions(self.phi, self.alpha, self.bias):  # built once per weights
            blocks = torch.tensor([n, n] if self.alpha.numel() == 2 else [n, n, n * n], device=self.phi.device)
            self._gate = self.alpha.float().repeat_interleave(blocks)  # [K]: alpha (pre, post, res) per column
            self._scale = torch.ones(2 * n, device=self.phi.device)
            self._scale[n:] = 2.0  # H_pre = sigmoid, H_post = 2 sigmoid
            self._decode_key = versions(self.phi, self.alpha, self.bias)
        v = x.reshape(-1, n * x.shape[-1])  # [N, nC]
        h = torch.mm(v, self.phi.float())  # [N, K], then the reordered RMSNorm in place
        h.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).square_().div_(v.shape[1]).add_(self.eps).sqrt_())
        logits = h.mul_(self._gate).add_(self.bias.float())  # [N, K]
        gates = torch.sigmoid(logits[:, : 2 * n]).mul_(self._scale)  # [N, 2n]: H_pre | H_post
        if self.alpha.numel() == 2:
            return gates[:, :n], gates[:, n:], None
        z = logits[:, 2 * n :].reshape(-1, n, n)  # [N, n, n], row-major
        m = torch.exp(z - z.amax(dim=(-2, -1), keepdim=True))
        for _ in range(self.iters):
            m.div_(m.sum(dim=-2, keepdim=True))  # columns first
            m.div_(m.sum(dim=-1, keepdim=True))  # rows last
        return gates[:, :n], gates[:, n:], m

    def coefficients(self, x):
        """(h_pre, h_post, h_res | None) of the streams x [..., n, C] (the plain math, numerics as configured)."""
        if self.deepseek:
            args = (self.phi, self.alpha, self.bias, self.iters, self.eps, self.hc_eps)
            return mhc_coefficients_deepseek(x, *args)
        return mhc_coefficients(x, self.phi, self.alpha, self.bias, self.iters, self.eps)

    def forward(self, x, sublayer):
        if decoding(x) and not self.deepseek:
            return decode_site(x, sublayer, *self.decode_coefficients(x))
        h_pre, h_post, h_res = self.coefficients(x)
        return mhc_post_res(x, sublayer(mhc_pre(x, h_pre)), h_post, h_res)


class SinglePassSite(MHCSite):
    """Single-pass mHC (mhc_train/model/single_pass.py): the packed state [B, T, n + 1, C] in and out. F reads x_l
    with the mix the previous site computed (row n); this site's H_pre, from x_l, is packed as the next mix."""

    def forward(self, state, sublayer):
        n = self.n
        x, mix = state[..., :n, :], state[..., n, :n]  # [B, T, n, C], [B, T, n]
        h_pre, h_post, h_res = self.coefficients(x)  # from x_l
        out = mhc_post_res(x, sublayer(mhc_pre(x, mix)), h_post, h_res)  # [B, T, n, C]
        return pack_state(out, h_pre)


def pack_state(x, mix):
    """(streams [B, T, n, C], mix [B, T, n]) -> [B, T, n + 1, C], the mix in row n's first n channels."""
    row = F.pad(mix.to(x.dtype), (0, x.shape[-1] - mix.shape[-1])).unsqueeze(-2)  # [B, T, 1, C]
    return torch.cat([x, row], dim=-2)


def make_site(cfg):
    conn = cfg.connection
    kind, n = conn.get("type", "residual"), conn.get("n_streams", 1)
    if kind == "residual":
        return ResidualSite()
    sites = {"hc": HCSite, "mhc": MHCSite, "mhc_single_pass": SinglePassSite}
    return sites[kind](cfg.hidden_size, n, conn)


def expand_streams(cfg, h):
    """The token embedding h [B, T, C] as the stream state: n copies [B, T, n, C]; single-pass appends the mix row
    (m_0 = e_0, the first sub-layer reads stream 0): [B, T, n + 1, C]."""
    conn = cfg.connection
    kind = conn.get("type", "residual")
    n = 1 if kind == "residual" else conn.get("n_streams", 4)
    x = h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()  # [B, T, n, C]
    if kind != "mhc_single_pass":
        return x
    mix = F.one_hot(torch.zeros(h.shape[:-1], dtype=torch.long, device=h.device), n)  # [B, T, n]
    return pack_state(x, mix)


class Collapse(nn.Module):
    """The final read of the streams [B, T, n, C] -> [B, T, C] in at least fp32: sum (the paper's) or mean (GLM-5.3);
    "mix" (single-pass): the carried mix (row n) reads the n streams."""

    def __init__(self, mode="sum", n=1):
        super().__init__()
        self.mode, self.n = mode, n

    def forward(self, x):
        acc = torch.promote_types(x.dtype, torch.float32)
        if self.mode == "mix":
            streams, mix = x[..., : self.n, :], x[..., self.n, : self.n]
            return (mix.to(acc).unsqueeze(-2) @ streams.to(acc)).squeeze(-2)  # [B, T, C]
        if self.mode == "mean":
            return x.mean(dim=-2, dtype=acc)
        return x.sum(dim=-2, dtype=acc)


class LearnedCollapse(nn.Module):
    """DeepSeek-V4's HyperHead (`ops/deepseek.py`, `collapse_learned_ref`): `sum_j w_j x_j`, `w = sigmoid(scale *
    RMSNorm(vec x) @ weight + bias) + hc_eps`; weight [nC, n], bias [n], scale [1]."""

    def __init__(self, dim, n, conn):
        super().__init__()
        self.eps, self.hc_eps = conn.get("eps", 1e-6), conn.get("hc_eps", 1e-6)
        self.weight = nn.Parameter(torch.zeros(n * dim, n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        h = rms_projection(x, self.weight, self.eps)  # [B, T, n]
        w = torch.sigmoid(h * self.scale.float() + self.bias.float()) + self.hc_eps  # [B, T, n]
        return mhc_pre(x.float(), w)  # [B, T, C]


def make_collapse(cfg):
    """The model's `collapse_conn` (connection.collapse; single-pass: its mix)."""
    conn = cfg.connection
    kind, n = conn.get("type", "residual"), conn.get("n_streams", 1)
    if kind == "mhc_single_pass":
        return Collapse("mix", n)
    mode = conn.get("collapse", "sum")
    return LearnedCollapse(cfg.hidden_size, n, conn) if mode == "learned" else Collapse(mode)
