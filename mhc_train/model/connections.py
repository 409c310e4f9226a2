"""Residual-stream connections: the Pre-Norm residual, Hyper-Connections (HC) and mHC, behind one interface.

Axis legend: B batch, T time, n streams, C channels.

A `Connection` is the whole residual-stream policy of a model:
- `expand(h)`   [B, T, C] -> [B, T, n, C]: the token embedding replicated n times (spec section 1);
- `site(C, k)`  the module of connection site k (two per block: attention, FFN). A site wraps a sub-layer F,
                `x_{l+1} = site(x_l, F)`, and replaces the residual add and nothing else;
- `collapse(x)` [B, T, n, C] -> [B, T, C]: sum over streams, before the final RMSNorm; `collapse_module(C)` is the
                one the model runs (`connection.collapse`: sum, mean, or DeepSeek-V4's learned head).

Every site exposes `coefficients(x) -> (h_pre [B,T,n], h_post [B,T,n], h_res [B,T,n,n] | None)` in this file's
convention (H_res left-multiplied: new stream i = sum_j H_res[i, j] x_j). The stability diagnostics read it, and
HC reports its H_res equivalent `A_r^T` through it.

Notes:
1. Parameters whose name contains `static_` are HC's static parts; the optimiser gives them no weight decay.
2. Constructors allocate with `torch.empty` and draw nothing from the RNG; `initial_values(generator)` gives every
   parameter's full initial value (the model writes them, whole or as this rank's shard).
3. A site holds parameters and its arm's coefficient math, nothing of how it runs: the connection builds one
   `mhc_train.ops.SiteStep` per model from `connection.backend` and gives it to every site; the step runs the site
   (coefficients, pre, F, post_res), resolves the backend once per device, and owns the kernels' one-dx chaining,
   the fp32 coefficient region and the n > 16 fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mhc_train import ops
from mhc_train.config import ConnectionConfig

SubLayer = Callable[[torch.Tensor], torch.Tensor]


class Site(nn.Module):
    """One connection site: `x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)` from the coefficients of `x_l`.

    A site owns its parameters and its arm's coefficient math (`_coefficients(x, kernels)`, written against the
    backend's ops); `mhc_train.ops.SiteStep` runs the whole site (coefficients, pre, F, post_res) on the backend it
    resolved once. The connection gives every site of a model the same step."""

    step: ops.SiteStep = ops.SiteStep("torch")  # the connection's step (config connection.backend)
    projects_h_res: bool = False  # H_res is Sinkhorn-projected (mHC); the diagnostics' column error applies
    _post_res_runner: Callable | None = None  # see `run_post_res_through`

    @property
    def backend(self) -> str:
        """The backend name (`connection.backend`); setting it gives the site a step of its own on that backend."""
        return self.step.name

    @backend.setter
    def backend(self, name: str) -> None:
        self.step = ops.SiteStep(name)

    def run_post_res_through(self, runner: Callable | None) -> None:
        """Run the post_res merge as `runner(fn, *args, **kwargs)` (None: call it directly). Chosen once, when the
        pipeline is built: DualPipeV's overlapped F/B routes the FFN sites' merge, the tensor the next stage waits
        for, through a runner that puts it on a high-priority CUDA stream during an overlapped forward."""
        self._post_res_runner = runner

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(h_pre [B,T,n], h_post [B,T,n], h_res [B,T,n,n] | None), computed in fp32."""
        return self.step.coefficients(self._coefficients, x)

    def _coefficients(self, x: torch.Tensor, kernels: ops.SiteKernels):
        """The arm's coefficient math on `kernels` (the backend's ops for this site call)."""
        raise NotImplementedError

    def read(self, x: torch.Tensor, pre: bool = True):
        """The site's first half: (F's input [B, T, C], or None without `pre`; the `ops.SiteRead` `write` takes)."""
        return self.step.read(self._coefficients, x, pre=pre)

    def write(self, x: torch.Tensor, y: torch.Tensor, read) -> torch.Tensor:
        """The site's second half: `H_res x + H_post^T y` [B, T, n, C], through the post_res runner if one is set."""
        return self.step.write(x, y, read, self._post_res_runner)

    def forward(self, x: torch.Tensor, sublayer: SubLayer) -> torch.Tensor:
        out, _ = self.step(self._coefficients, x, sublayer, self._post_res_runner)  # [B, T, n, C]
        return out

    def initial_values(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{parameter name: its full initial value}, drawn from `generator` (on the generator's device)."""
        return {}

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Set every parameter of a standalone site (a model sets them through `Transformer.init_weights`)."""
        with torch.no_grad():
            for name, value in self.initial_values(generator).items():
                getattr(self, name).copy_(value)


class ResidualSite(Site):
    """Pre-Norm residual, n = 1: `x + F(x)`. No parameters, no coefficients to compute: the add is the whole site."""

    def _coefficients(self, x, kernels):
        ones = x.new_ones(x.shape[:-1], dtype=torch.float32)  # [B, T, 1]
        return ones, ones, ones.unsqueeze(-1)

    def write(self, x, y, read=None) -> torch.Tensor:
        runner = self._post_res_runner
        return torch.add(x, y.unsqueeze(-2)) if runner is None else runner(torch.add, x, y.unsqueeze(-2))

    def forward(self, x: torch.Tensor, sublayer: SubLayer) -> torch.Tensor:
        return self.write(x, sublayer(x.squeeze(-2)))


class HCSite(Site):
    """Hyper-Connections (Zhu et al., 2409.19606), static or dynamic (DHC), in this file's convention.

    Static: B (write, [n]) = 1, A_m (read, [n]) one-hot on stream k mod n, A_r (mix, [n, n]) = I, so a freshly
    built HC model equals the Pre-Norm baseline. Dynamic: each stream is RMS-normalised on its own, then
    `A_m += s_alpha tanh(norm(x_j) W_m)`, `A_r[j, :] += s_alpha tanh(norm(x_j) W_r)`, `B += s_beta tanh(norm(x_j) W_b)`,
    with W = 0 and s_alpha = s_beta = 0.01 at init. h_pre = A_m, h_post = B, h_res = A_r^T.
    """

    def __init__(self, dim: int, n: int, index: int, cfg: ConnectionConfig, step: ops.SiteStep | None = None):
        super().__init__()
        self.n, self.index, self.dynamic, self.scale_init = n, index, cfg.hc_dynamic, cfg.hc_dynamic_scale_init
        self.step = step or ops.SiteStep(cfg.backend)
        self.static_beta = nn.Parameter(torch.empty(n))
        self.static_alpha_m = nn.Parameter(torch.empty(n))
        self.static_alpha_r = nn.Parameter(torch.empty(n, n))
        if self.dynamic:
            self.norm_weight = nn.Parameter(torch.empty(dim))  # per-stream RMSNorm gain, shared by the streams
            self.dyn_proj = nn.Parameter(torch.empty(dim, n + 2))  # columns [W_m | W_b | W_r (n)]
            self.dyn_scale = nn.Parameter(torch.empty(2))  # (s_alpha, s_beta)
        self.eps = cfg.eps

    def initial_values(self, generator=None):
        n, dev = self.n, generator.device if generator is not None else None
        values = {
            "static_beta": torch.ones(n, device=dev),
            "static_alpha_m": torch.zeros(n, device=dev).index_fill_(
                0, torch.tensor([self.index % n], device=dev), 1.0
            ),
            "static_alpha_r": torch.eye(n, device=dev),
        }
        if self.dynamic:
            values["norm_weight"] = torch.ones(self.norm_weight.shape, device=dev)
            values["dyn_proj"] = torch.zeros(self.dyn_proj.shape, device=dev)
            values["dyn_scale"] = torch.full((2,), self.scale_init, device=dev)
        return values

    def _coefficients(self, x, kernels):
        n, lead = self.n, x.shape[:-2]
        # row j of the [n, n+2] block: (A_m[j], B[j], A_r[j, :]); h_pre = A_m, h_post = B, h_res = A_r^T
        static = torch.cat([self.static_alpha_m[:, None], self.static_beta[:, None], self.static_alpha_r], 1).float()
        if not self.dynamic:
            block = static.expand(*lead, n, n + 2)
            return block[..., 0], block[..., 1], block[..., 2:].transpose(-1, -2)
        weight = self.norm_weight.float()[:, None] * self.dyn_proj.float()  # [C, n+2], the norm's gain folded in
        h = kernels.hc_projection(x, weight, self.eps)  # RMSNorm(x_j) @ W: [B, T, n, n+2]
        s_alpha, s_beta = self.dyn_scale.float().unbind()
        scale = torch.cat([s_alpha[None], s_beta[None], s_alpha.expand(n)])  # [n+2]
        return kernels.hc_gates(h, static, scale)  # tanh(h) * scale + static, split


class MHCSite(Site):
    """mHC (DeepSeek, 2512.24880, Eqs. 7-9): coefficients from the flattened, RMS-normalised nC stream state.

    phi [nC, n^2+2n] (RMSNorm gain folded in) ~ N(0, phi_init_std); alpha (pre, post, res) = alpha_init (the gate
    scale: how strongly the input-dependent part moves the coefficients); bias [pre | post | res]. `h_res: identity`
    drops the res columns and the res gate and fixes H_res = I (the ablation arm of spec section 5).

    Init (config `connection.*`; the paper gives only alpha = 0.01):
    - symmetric (`read_init: uniform`, `b_res_init: uniform`, configs/connection/mhc.yaml): H_pre = sigmoid(b_pre_init)
      on every stream, H_post = 2 sigmoid(b_post_init) = 1, H_res = J/n. With replicated streams every stream gets
      the same gradient, and Sinkhorn is blind to a gradient constant along rows, so only phi's random init breaks
      the symmetry (at phi_init_std = 0 the streams stay identical and H_res stays J/n forever).
    - HC-like (`read_init: one_hot`, `b_res_init: identity`, configs/connection/mhc_hclike.yaml): site k reads stream
      k mod n (b_pre = +read_logit there, -read_logit elsewhere) and H_res starts near I (diagonal logit
      b_res_diag). The streams' gradients differ from step 0, so H_post, the streams and H_res move, as in HC.
    """

    def __init__(self, dim: int, n: int, index: int, cfg: ConnectionConfig, step: ops.SiteStep | None = None):
        super().__init__()
        self.n, self.index, self.cfg = n, index, cfg
        self.step = step or ops.SiteStep(cfg.backend)
        self.identity_res = cfg.h_res == "identity"
        self.projects_h_res = not self.identity_res
        k = 2 * n if self.identity_res else n * n + 2 * n
        self.phi = nn.Parameter(torch.empty(n * dim, k))
        self.alpha = nn.Parameter(torch.empty(2 if self.identity_res else 3))
        self.bias = nn.Parameter(torch.empty(k))

    def initial_values(self, generator=None):
        n, c, dev = self.n, self.cfg, generator.device if generator is not None else None
        phi = torch.zeros(self.phi.shape, device=dev)
        if c.phi_init_std:
            phi.normal_(0.0, c.phi_init_std, generator=generator)
        bias = torch.empty(self.bias.shape, device=dev)
        if c.read_init == "one_hot":
            bias[:n] = -c.read_logit
            bias[self.index % n] = c.read_logit
        else:
            bias[:n] = c.b_pre_init
        bias[n : 2 * n] = c.b_post_init
        if not self.identity_res:
            diag = c.b_res_diag if c.b_res_init == "identity" else 0.0
            bias[2 * n :] = (torch.eye(n, device=dev) * diag).flatten()
        return {"phi": phi, "alpha": torch.full(self.alpha.shape, c.alpha_init, device=dev), "bias": bias}

    def _coefficients(self, x, kernels):
        c = self.cfg
        if c.numerics == "deepseek_v4":  # DeepSeek-V4's arithmetic (docs/mhc.md section 8)
            return kernels.mhc_coefficients_deepseek(x, self.phi, self.alpha, self.bias, c.t_max, c.eps, c.hc_eps)
        return kernels.mhc_coefficients(x, self.phi, self.alpha, self.bias, c.t_max, c.eps, c.sinkhorn_backward)


class Collapse(nn.Module):
    """The final read of the n streams, [B, T, n, C] -> [B, T, C] in at least fp32 (`connection.collapse`): `sum`
    (the paper's) or `mean` (GLM-5.3); no parameters. `LearnedCollapse` is DeepSeek-V4's head."""

    def __init__(self, mode: str = "sum"):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        if self.mode == "mean":
            return x.mean(dim=-2, dtype=acc)  # [B, T, C]
        return x.sum(dim=-2, dtype=acc)  # [B, T, C], accumulated in >= fp32


class LearnedCollapse(Collapse):
    """DeepSeek-V4's `HyperHead` (docs/mhc.md section 9): `sum_j w_j x_j` with `w = sigmoid(scale * RMSNorm(vec x) @
    weight + bias) + hc_eps`. weight [nC, n] (their `hc_fn` transposed), bias [n] (`hc_base`), scale [1] (`hc_scale`).
    Init as transformers': weight ~ N(0, phi_init_std), bias 0, scale 1 (w = 0.5 + hc_eps per stream). Its parameters
    are connection parameters (the module is the model's `collapse_conn`: the optimizer's connection groups)."""

    def __init__(self, dim: int, n: int, cfg: ConnectionConfig):
        super().__init__("learned")
        self.n, self.cfg = n, cfg
        self.weight = nn.Parameter(torch.empty(n * dim, n))
        self.bias = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))

    def initial_values(self, generator=None):
        dev = generator.device if generator is not None else None
        weight = torch.zeros(self.weight.shape, device=dev)
        if self.cfg.phi_init_std:
            weight.normal_(0.0, self.cfg.phi_init_std, generator=generator)
        return {"weight": weight, "bias": torch.zeros(self.n, device=dev), "scale": torch.ones(1, device=dev)}

    def init_weights(self, generator=None) -> None:
        with torch.no_grad():
            for name, value in self.initial_values(generator).items():
                getattr(self, name).copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with ops.coefficient_region(x):
            return ops.collapse_learned_ref(x, self.weight, self.bias, self.scale, self.cfg.eps, self.cfg.hc_eps)


class Connection:
    """The residual-stream policy of a model: expand, build sites, collapse. Not a module: it holds no weights."""

    site_cls: type[Site] = ResidualSite

    def __init__(self, cfg: ConnectionConfig):
        self.cfg = cfg  # validated by build_model (or load_config)
        self.n_streams = cfg.n_streams
        self.step = ops.SiteStep(cfg.backend)  # one per model: `connection.backend` resolved once per device

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2).expand(*h.shape[:-1], self.n_streams, h.shape[-1]).contiguous()  # [B, T, n, C]

    def collapse(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=-2, dtype=torch.promote_types(x.dtype, torch.float32))  # [B, T, C], accumulated in >= fp32

    def site(self, dim: int, index: int) -> Site:
        return self.site_cls(dim, self.n_streams, index, self.cfg, self.step)

    def collapse_module(self, dim: int) -> Collapse:
        """The model's final read as a module (`connection.collapse`); `sum` computes exactly `collapse`."""
        mode = getattr(self.cfg, "collapse", "sum")
        return LearnedCollapse(dim, self.n_streams, self.cfg) if mode == "learned" else Collapse(mode)

    @property
    def out_proj_std_factor(self) -> float:
        """Multiplier of the output projections' init std (HC's sqrt(n) flag; 1 otherwise)."""
        return 1.0

    def chain_sites(self, sites: list[Site]) -> None:
        """The model's sites in forward order, once, after they are built: an arm whose site can do the next site's
        work in its own pass (single-pass mHC) remembers its successor; the others need nothing."""


class Residual(Connection):
    def site(self, dim: int, index: int) -> Site:
        return ResidualSite()


class HC(Connection):
    site_cls = HCSite

    @property
    def out_proj_std_factor(self) -> float:
        mode, root = self.cfg.hc_out_proj_init, self.n_streams**0.5
        return {"none": 1.0, "mul_sqrt_n": root, "div_sqrt_n": 1.0 / root}[mode]


class MHC(Connection):
    site_cls = MHCSite


CONNECTIONS: dict[str, type[Connection]] = {"residual": Residual, "hc": HC, "mhc": MHC}  # + single_pass.py's


def build_connection(cfg: ConnectionConfig) -> Connection:
    # `mhc_single_pass` (single_pass.py, which builds on this file) registers itself; the package imports it
    return CONNECTIONS[cfg.type](cfg)  # cfg was validated by build_model or load_config
