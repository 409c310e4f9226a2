"""Selective recomputation of the connection work, block by block (mHC paper section 4.3, Eq. 20; spec section 6).

Modes (`parallel.recompute`, block size `parallel.recompute_block`):
- `none`: the plain model, everything kept.
- `mhc`:  within a block of L_r consecutive sites, autograd keeps only the block input `x_{l0}` (nC per token) and
          each site's F output `y_l` (C per token). Coefficients, Sinkhorn state, the inner stream states `x_l`, the
          pre-mixed F input and its RMSNorm are dropped after the forward and recomputed in the backward from
          `x_{l0}` and the `y`s. F proper (attention, FFN) keeps its own activations and is never recomputed.
- `full`: whole groups of L_r sites (F included) keep only their input and recompute everything (the usual fallback
          for the largest models).

Blocks never cross a pipeline-stage boundary: `plan_blocks` takes the stage layout (sites per stage; the pipeline
applies recompute to each stage module on its own) and cuts each stage separately. `auto` picks L_r per stage by
minimising the paper's peak `nC * ceil(L / L_r) + (n + 2) C * L_r`; `stage` makes each stage one block, as the paper
does.

Note:
1. Every custom Function here returns parameter gradients as outputs (never writes `.grad` itself). Split-backward
   schedules (ZBV, DualPipeV) call a Function's backward twice: input gradients, then weight gradients through
   `autograd.grad` on GradientEdges. `ctx.needs_input_grad` is fixed at forward time and cannot tell the two calls
   apart, so differentiable inputs enter through their own `view_as` node and `backward` asks the engine which of
   them this call needs (`_wanted`), computing only that half. Only `_SitePre` touches the site's parameters, so
   the weight call never walks through F. Recomputation happens locally inside `backward` (no reentrant
   `.backward()` into the model graph), which is the non-reentrant semantics pipeline schedules need.
2. In `mhc` mode each site is two Functions around F: `_SitePre` (x_l -> RMSNorm(H_pre x_l), F's input) and
   `_SitePost` (x_l, y_l -> x_{l+1}). Both save `x_{l0}` and the block's `y`s so far (shared storages, counted once),
   and get `x_l` from a per-block cache that replays the block's stream updates without gradient.
3. Forward computes the coefficients once per site (in `_SitePre`, handed to `_SitePost`). Backward replays the
   block without gradient (its coefficients also give y's gradient) and recomputes each site once more with
   gradient: on CPU at demo size this costs what `scripts/bench_recompute.py` prints.
4. Gradients are bit-identical to the plain model's (tested): `_SitePre` replays the whole site as one local graph,
   so autograd sums each gradient in the order the plain graph does. Every replay runs the site's own step in its
   two halves (`Site.read`: coefficients and pre; `Site.write`: post_res), never a copy of the site.
5. Under FSDP (fsdp.py note 1) F's modules are units of their own and the sites' and norms' parameters plain
   tensors. `mhc` needs nothing more: F runs through its own forward, where FSDP gathers and frees its weights.
   `full` cannot pass F's parameters into `_FullRecompute` (they are shards, swapped for gathered copies only
   inside F's forward), so a sharded group runs under torch's non-reentrant `checkpoint`, which re-runs F's forward,
   FSDP hooks included, in backward. ZBV / DualPipeV keep one unit per stage and `_FullRecompute`.
6. Single-pass mHC's cross-site fusion (model/single_pass.py: a site's write computes the next site's read) stops at
   group boundaries: `_chain_groups` chains the sites within each group only. Across one nothing could take the read
   (the next group gets a new tensor, `_views`, and the replays run the groups last first), so a group's last site
   computes none and leaves no prefetched tensor behind; `mhc` replays the halves, which never fuse.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from mhc_train.config import RECOMPUTE_MODES as MODES


def optimal_block(n: int, n_sites: int) -> int:
    """argmin over L_r in [1, n_sites] of nC*ceil(L/L_r) + (n+2)C*L_r (C cancels); near sqrt(nL/(n+2))."""
    return min(range(1, n_sites + 1), key=lambda r: (n * math.ceil(n_sites / r) + (n + 2) * r, r))


def plan_blocks(n_sites: int, n: int, block: int | str = "auto", stage_sites: list[int] | None = None):
    """Site index ranges [(start, stop), ...] of the recompute blocks; none crosses a stage boundary."""
    stage_sites = stage_sites or [n_sites]
    if sum(stage_sites) != n_sites or any(s < 1 for s in stage_sites):
        raise ValueError(f"stage layout {stage_sites} must split the {n_sites} sites into positive parts")
    if block not in ("auto", "stage") and (not isinstance(block, int) or block < 1):
        raise ValueError(f"recompute.block={block!r} is invalid: give a positive number of sites, auto or stage")
    blocks, start = [], 0
    for size in stage_sites:
        r = optimal_block(n, size) if block == "auto" else size if block == "stage" else min(block, size)
        blocks += [(s, min(s + r, start + size)) for s in range(start, start + size, r)]
        start += size
    return blocks


class _BlockCache:
    """Per recompute block: replays the stream updates (no gradient) to give each site its input x_l in backward,
    and carries hand-offs between a site's two Functions (coefficients forward, the post gradient backward)."""

    def __init__(self, sites):
        self.sites = sites
        self.xs: list[torch.Tensor] | None = None
        self.replayed: list = []  # the read half (`ops.SiteRead`) of each replayed site, no gradient
        self.coeffs = None  # forward: _SitePre -> _SitePost of the same site (its read half)
        self.grad_out: dict[int, tuple] = {}  # backward: _SitePost -> _SitePre, (y_l, grad of x_{l+1})
        self.done = 0  # sites whose parameter gradients are computed (the block's states are released after all)

    def state(self, i: int, x0: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x_i, replaying sites 0..i-1 of the block from x0 and their F outputs (once per backward)."""
        if self.xs is None or len(self.xs) <= i:
            with torch.no_grad():
                xs, self.replayed = [x0], []
                for site, y in zip(self.sites[:i], ys):
                    _, read = site.read(xs[-1], pre=False)
                    self.replayed.append(read)
                    xs.append(site.step.write(xs[-1], y, read))
            self.xs = xs
        return self.xs[i]

    def mixing(self, i: int, x: torch.Tensor):
        """Site i's read half (its h_post, h_res) without gradient: from the replay when it covered site i."""
        if i < len(self.replayed):
            return self.replayed[i]
        with torch.no_grad():
            return self.sites[i].read(x, pre=False)[1]

    def release(self) -> None:
        self.xs, self.replayed, self.done = None, [], 0


def _views(tensors):
    """Differentiable inputs of a Function passed through `view_as`: each then has a non-leaf grad_fn of its own,
    which lets `backward` ask the engine whether this call needs that input's gradient (`_wanted`)."""
    return [t.view_as(t) if t.requires_grad else t for t in tensors]


def _remember_nodes(ctx, tensors) -> None:
    ctx.nodes = [t.grad_fn if t.requires_grad else None for t in tensors]


def _wanted(ctx) -> list[bool]:
    """Per remembered input: is its gradient needed by *this* backward call? `ctx.needs_input_grad` is fixed at
    forward time; a split-backward schedule calls backward twice (input gradients, then weight gradients through
    `autograd.grad` on GradientEdges), and each call should compute only its half."""
    return [node is not None and torch._C._will_engine_execute_node(node) for node in ctx.nodes]


def _grads(outputs, inputs, grad_outs, needed):
    """autograd.grad over the inputs whose flag is set; None elsewhere."""
    chosen = [t for t, need in zip(inputs, needed) if need]
    got = iter(torch.autograd.grad(outputs, chosen, grad_outs, allow_unused=True) if chosen else [])
    return [next(got) if need else None for need in needed]


class _SitePre(torch.autograd.Function):
    """x_l -> z_l = RMSNorm(H_pre x_l) (F's input). Its backward replays the whole site (coefficients, pre, norm,
    post_res) as one local graph fed with both upstream gradients (z_l's, and x_{l+1}'s from `_SitePost`), so every
    gradient is summed in the same order as in the plain model: recompute changes no bit."""

    @staticmethod
    def forward(ctx, x, x0, ys, site, norm, cache, i, *params):
        with torch.no_grad():
            f_in, read = site.read(x)
            z = norm(f_in)  # [B, T, C]
        cache.coeffs = read
        ctx.site, ctx.norm, ctx.cache, ctx.i = site, norm, cache, i
        _remember_nodes(ctx, (x, *params))
        ctx.save_for_backward(x0.detach(), *(y.detach() for y in ys))
        return z

    @staticmethod
    def backward(ctx, g_z):
        x0, *ys = ctx.saved_tensors
        cache = ctx.cache
        x = cache.state(ctx.i, x0, tuple(ys[: ctx.i]))
        needed = _wanted(ctx)
        # An input-only call (the first half of a split backward) leaves the post gradient and the replayed states
        # for the weight call that follows; any call that computes the parameters' gradients consumes them.
        input_only = needed[0] and not any(needed[1:]) and any(n is not None for n in ctx.nodes[1:])
        y, g_out = cache.grad_out[ctx.i] if input_only else cache.grad_out.pop(ctx.i)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(needed[0])
            params = list(ctx.norm.parameters()) + list(ctx.site.parameters())
            # the plain model's site step, F replaced by its known output y (one dx per site on the kernels, as
            # there): the same sums, the same bits
            f_in, read = ctx.site.read(xg)
            z = ctx.norm(f_in)
            out = ctx.site.step.write(xg, y, read)
            gx, *gp = _grads([z, out], [xg, *params], [g_z, g_out], needed)
        if not input_only:
            cache.done += 1
            if cache.done == len(cache.sites):
                cache.release()  # every site of the block has its gradients: drop the replayed states
        return (gx, None, None, None, None, None, None, *gp)


class _SitePost(torch.autograd.Function):
    """(x_l, y_l) -> x_{l+1}. Backward gives only y_l's gradient (F needs it next) and hands x_{l+1}'s gradient to
    `_SitePre`, which returns the gradients of x_l and of the site's parameters."""

    @staticmethod
    def forward(ctx, x, y, x0, ys, site, cache, i):
        read, cache.coeffs = cache.coeffs, None
        with torch.no_grad():
            out = site.write(x, y, read)  # through the site's post_res runner, as in the plain model
        ctx.site, ctx.cache, ctx.i = site, cache, i
        ctx.save_for_backward(x0.detach(), *(t.detach() for t in ys), y.detach())
        return out

    @staticmethod
    def backward(ctx, g):
        x0, *ys = ctx.saved_tensors
        y = ys.pop()
        ctx.cache.grad_out[ctx.i] = (y, g)  # _SitePre needs it for x_l's and the parameters' gradients
        gy = None
        if ctx.needs_input_grad[1]:
            x = ctx.cache.state(ctx.i, x0, tuple(ys))
            read = ctx.cache.mixing(ctx.i, x)
            with torch.enable_grad():
                yg = y.detach().requires_grad_()
                (gy,) = torch.autograd.grad(ctx.site.step.write(x, yg, read), yg, g)
        return None, gy, None, None, None, None, None


def _run_mhc_block(parts, x):
    """Sites of one block with connection intermediates recomputed in backward. parts: [SitePart]."""
    cache, x0, ys = _BlockCache([p.site for p in parts]), x, []
    for i, (site, norm, f, _) in enumerate(parts):
        params = _views([*norm.parameters(), *site.parameters()])
        (xv,) = _views([x])
        z = _SitePre.apply(xv, x0, tuple(ys), site, norm, cache, i, *params)
        y = f(z)  # F proper keeps its own activations
        x = _SitePost.apply(x, y, x0, tuple(ys), site, cache, i)
        ys.append(y)
    return x


def _plain_sites(parts, x):
    for site, norm, f, _ in parts:
        x = site(x, lambda h, norm=norm, f=f: f(norm(h)))
    return x


class _FullRecompute(torch.autograd.Function):
    """Keeps only the group input (saved, so memory accounting sees it); backward re-runs the group with grad."""

    @staticmethod
    def forward(ctx, x, parts, n_params, *params):
        ctx.parts, ctx.autocast = parts, _autocast_state(x.device.type)
        _remember_nodes(ctx, (x, *params))
        ctx.save_for_backward(x.detach())
        with torch.no_grad():
            return _plain_sites(parts, x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        params = [p for part in ctx.parts for p in _part_params(part)]
        needed = _wanted(ctx)  # a split backward asks for the input, then the weights: recompute computes each once
        device_type, enabled, dtype = ctx.autocast  # the replay runs F as the forward did (bf16 under autocast)
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            xg = x.detach().requires_grad_(needed[0])
            out = _plain_sites(ctx.parts, xg)
        gx, *gp = _grads(out, [xg, *params], g, needed)
        return (gx, None, None, *gp)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """(device type, enabled, dtype) of autocast now: backward runs outside the forward's autocast context."""
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _part_params(part) -> list:
    return [*part.site.parameters(), *part.norm.parameters(), *part.owner.parameters()]


def _sharded(parts) -> bool:
    """Whether F's modules are FSDP units of their own (fsdp.py note 1): their parameters are gathered by FSDP's hooks
    around each call, so they cannot enter `_FullRecompute` as inputs; torch's non-reentrant checkpoint, which
    re-runs those calls (and hooks) in backward, recomputes the group instead."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(parts[0].owner, FSDPModule)


def _chain_groups(model, plan) -> None:
    """Chain the sites (`Connection.chain_sites`) within each group of `plan` only (note 6); one group of all the
    sites restores the model's own chain."""
    sites = [site for _, site in model.sites()]
    for start, stop in plan:
        model.conn.chain_sites(sites[start:stop])


def apply_recompute(model, mode: str, block: int | str = "auto", stage_sites: list[int] | None = None):
    """Choose `model`'s block runner for `mode` (`model.use_block_runner`); returns the block plan. `none` (and `mhc`
    on the residual baseline, which has no connection intermediates to drop) keeps the plain loop."""
    if mode not in MODES:
        raise ValueError(f"parallel.recompute={mode!r} is invalid: allowed values are {', '.join(MODES)}")
    block = block if block in ("auto", "stage") else int(block)
    n_sites = 2 * len(model.layers)
    plan = plan_blocks(n_sites, model.n_streams, block, stage_sites)
    if mode == "none" or (mode == "mhc" and model.conn_cfg.type == "residual"):
        model.use_block_runner(None)
        _chain_groups(model, [(0, n_sites)])
        return plan
    _chain_groups(model, plan)

    def runner(parts, h):
        for start, stop in plan:
            group = parts[start:stop]
            if mode == "mhc":
                h = _run_mhc_block(group, h)
            elif _sharded(group):
                h = checkpoint(_plain_sites, group, h, use_reentrant=False)
            else:
                params = [p for part in group for p in _part_params(part)]
                (hv,) = _views([h])
                h = _FullRecompute.apply(hv, group, len(params), *_views(params))
        return h

    model.use_block_runner(runner)
    return plan
