"""Stability diagnostics of the residual-stream mixing (mHC paper section 7 / spec section 7).

For a matrix A (one site's H_res, or a product of them): forward Amax gain = max absolute row sum, backward gain =
max absolute column sum, each averaged over the tokens of a fixed batch. Composite products: forward up to site l is
`H_l ... H_1`; backward from site l to the output is `H_L ... H_l`. The minimum column sum is logged too, since
attenuation is invisible to a max. HC reports its H_res equivalent (A_r^T); identity H_res and the residual baseline
report exact 1s. Single-pass mHC (docs/mhc.md section 10) composes the same chain: its state carries the lagged read
mix as row n, which is no stream (the site's coefficients take n from the streams), and its H_res acts as the other
mHC arms' does; its site l's H_pre is the read mix of site l + 1 (tests/train/test_single_pass_diagnostics.py).

Whether H_res moves at all (issue 15): each site's mean Frobenius distance of H_res from J/n (the symmetric init) and
from I (the HC-like init). Values that have no meaning are None: the distances for n = 1 (the residual baseline), the
Sinkhorn column error for a site whose H_res is never projected (HC, mHC with `h_res: identity`).

Where they run: `SiteProbe` computes the statistics of consecutive sites from their coefficients, captured by hooks
during a forward, and composes across pipeline stages (the forward composite carried forward, the backward one back);
the engine runs it where its weights live (`Engine.site_statistics`: the plain model on rank 0 where it is whole,
the FSDP / ZeRO-3 sharded copy on every rank, each pipeline stage on its own rank), so no rank gathers the whole
model for them. `connection_diagnostics(model, tokens)` is the same on a plain model in one process.

`Diagnostics` is the loop's component that runs them: every `train.diag_every` steps a `diag` record (the statistics
above on a fixed batch, and this rank's per-layer grad norms taken before the optimizer step), and the full gradient
dump of `train.dump_grads_at`.
"""

from __future__ import annotations

import contextlib

import torch


def amax_gains(m: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) Amax gain of m [..., n, n], averaged over the leading (token) axes."""
    rows = m.abs().sum(-1).amax(-1)  # [...]
    cols = m.abs().sum(-2).amax(-1)
    return rows.mean().item(), cols.mean().item()


@torch.no_grad()
def connection_diagnostics(model, tokens: torch.Tensor) -> dict:
    """Per-site and composite statistics of H_res, H_pre and H_post on `tokens` [B, T] (one process, the plain model).

    Memory: each site's coefficients are computed as the forward reaches it and only they are kept ([B, T, 2n + n^2]
    per site, against the [B, T, n, C] stream input: 1/300 of it at n = 4, C = 2048), so the diagnostics never hold
    more than one site's stream beyond what the forward itself does."""
    probe = SiteProbe()
    with probe.capture(model):
        model.run_blocks(model.embed(tokens), plain=True)  # the plain loop calls every site (recompute does not)
    probe.forward(None)  # one run of sites: nothing before it, nothing after
    probe.backward(None)
    return summarise(probe.sites)


class SiteProbe:
    """The statistics of a run of consecutive sites (a whole model, or one pipeline stage), on the device they live on.

    `capture(module)` records each site's coefficients during a forward of `module` (its hooks run after any FSDP /
    ZeRO-3 hook has gathered the site's weights); `forward(prefix)` computes the per-site statistics and the forward
    composites continuing `prefix` (H_{l-1} ... H_1 of the earlier stages, None at the first) and returns the
    prefix for the next stage; `backward(suffix)` adds the backward composites from `suffix` (H_L ... H_{l+1} of the
    later stages, None at the last) and returns the one for the previous stage. `sites` is {name: statistics}."""

    def __init__(self):
        self.sites: dict[str, dict] = {}
        self._coeffs: dict[str, tuple] = {}
        self._h_res: list[tuple[str, torch.Tensor]] = []
        self._order: list[tuple[str, torch.nn.Module]] = []
        # sequence parallelism: this rank's coefficients [B, T/tp, ...] -> every token's [B, T, ...] (a collective),
        # set by the tensor-parallel engines so that the statistics cover the whole batch; None: the tokens are whole
        self.whole_tokens = None

    @contextlib.contextmanager
    def capture(self, module):
        self._order = list(module.sites())

        def keep(name, site, x):
            coeffs = site.coefficients(x)  # n from h_pre: a single-pass state carries one row more than n
            if self.whole_tokens is not None:
                coeffs = tuple(c if c is None else self.whole_tokens(c) for c in coeffs)
            self._coeffs[name] = (*coeffs, coeffs[0].shape[-1])

        handles = [
            site.register_forward_pre_hook(lambda mod, args, name=name: keep(name, mod, args[0]))
            for name, site in self._order
        ]
        try:
            with torch.no_grad():
                yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def forward(self, prefix: torch.Tensor | None) -> torch.Tensor | None:
        fwd = prefix
        for name, site in self._order:
            h_pre, h_post, h_res, n = self._coeffs.pop(name)
            if h_res is None:
                h_res = torch.eye(n, device=h_pre.device).expand(*h_pre.shape[:-1], n, n)
            h_res = h_res.double()
            col = h_res.sum(-2)  # [B, T, n]
            f_gain, b_gain = amax_gains(h_res)
            fwd = h_res if fwd is None else h_res @ fwd  # H_l ... H_1
            cf, cb = amax_gains(fwd)
            self._h_res.append((name, h_res))
            eye = torch.eye(n, dtype=h_res.dtype, device=h_res.device)
            self.sites[name] = {
                "fwd_gain": f_gain,
                "bwd_gain": b_gain,
                "min_col_sum": col.min().item(),
                "sinkhorn_col_err": (col - 1).abs().max().item() if getattr(site, "projects_h_res", False) else None,
                "h_res_dist_uniform": _frobenius(h_res - 1.0 / n) if n > 1 else None,
                "h_res_dist_identity": _frobenius(h_res - eye) if n > 1 else None,
                "composite_fwd_gain": cf,
                "composite_fwd_bwd_gain": cb,
                "h_pre_min": h_pre.min().item(),
                "h_pre_max": h_pre.max().item(),
                "h_post_min": h_post.min().item(),
                "h_post_max": h_post.max().item(),
            }
        return fwd

    @torch.no_grad()
    def backward(self, suffix: torch.Tensor | None) -> torch.Tensor | None:
        prod = suffix  # backward composites: H_L ... H_l for every l, built from the output end
        for name, h_res in reversed(self._h_res):
            prod = h_res if prod is None else prod @ h_res
            self.sites[name]["composite_bwd_gain"] = amax_gains(prod)[1]
            self.sites[name]["composite_min_col_sum"] = prod.sum(-2).min().item()
        self._h_res = []
        return prod


def summarise(sites: dict[str, dict]) -> dict:
    """The `diag` record's statistics from every site's (in forward order): the sites and the maxima / means."""
    vals = list(sites.values())
    return {
        "sites": sites,
        "composite_fwd_gain_max": max(v["composite_fwd_gain"] for v in vals),
        "composite_bwd_gain_max": max(v["composite_bwd_gain"] for v in vals),
        "single_bwd_gain_max": max(v["bwd_gain"] for v in vals),
        "min_col_sum": min(v["min_col_sum"] for v in vals),
        "sinkhorn_col_err_max": _max_or_none(v["sinkhorn_col_err"] for v in vals),
        "h_res_dist_uniform_mean": _mean_or_none(v["h_res_dist_uniform"] for v in vals),
        "h_res_dist_identity_mean": _mean_or_none(v["h_res_dist_identity"] for v in vals),
    }


def _frobenius(d: torch.Tensor) -> float:
    """Mean over the tokens of the Frobenius norm of d [..., n, n]."""
    return d.square().sum((-2, -1)).sqrt().mean().item()


def _max_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _mean_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def grad_norms(named_grads) -> dict:
    """Per-layer gradient L2 norms (embedding, each block, head) and the global norm, from (name, grad) pairs of the
    plain model's parameters (`Engine.local_named_grads`)."""
    sq: dict[str, float] = {}
    for name, grad in named_grads:
        parts = name.split(".")
        group = f"layer{parts[1]}" if parts[0] == "layers" else parts[0]
        sq[group] = sq.get(group, 0.0) + grad.detach().double().square().sum().item()
    out = {k: v**0.5 for k, v in sq.items()}
    out["global"] = sum(sq.values()) ** 0.5
    return out


class Diagnostics:
    """The loop's diagnostics on their own cadence. Per step: `dump_grads` after the backward, `collect` before the
    optimizer step (the grads are gone after it), `log` after it. `batch` [B, T] is the fixed batch diagnosed."""

    def __init__(self, every: int, dump_grads_at: int, batch: torch.Tensor, dist, grads_path):
        self.every, self.dump_grads_at, self.batch, self.dist = every, dump_grads_at, batch, dist
        self.grads_path = grads_path  # step -> the file of the gradient dump
        self._norms: dict | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def dump_grads(self, engine, step: int) -> None:
        """At `train.dump_grads_at`: the full gradients, gathered (a collective: every rank calls it), saved by rank 0."""
        if self.dump_grads_at == step:
            grads = engine.gather_grads()
            if self.dist.is_main:
                torch.save(grads, self.grads_path(step))

    def collect(self, engine, step: int) -> None:
        """On diag steps, this rank's per-layer grad norms (None where the engine has no local grads)."""
        grads = engine.local_named_grads() if self.due(step) else None
        self._norms = grad_norms(grads) if grads is not None else None

    def log(self, engine, step: int, result, metrics) -> None:
        """The `diag` record of a diag step; `result.grad_norm` (the global norm) stands in for missing layer norms.
        A collective where the weights are sharded or cut: the engine runs the probes where its weights live."""
        if not self.due(step):
            return
        # eager: under train.compile the blocks are compiled in place, and the probe's hooks (added here) must see
        # every site call rather than a graph traced before they existed
        with torch.compiler.set_stance("force_eager"):
            sites = engine.site_statistics(self.batch, SiteProbe)
        moe = engine.moe_metrics()  # MoE models: per-layer expert load, drops, router entropy, bias (a collective)
        if self.dist.is_main:
            diag = summarise(sites)
            if moe:
                diag["moe"] = moe
            metrics.record("diag", step, grad_norms=self._norms or {"global": result.grad_norm}, **diag)
