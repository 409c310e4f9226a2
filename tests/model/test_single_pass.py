"""Single-pass ("lagged") mHC (`connection.type: mhc_single_pass`, model/single_pass.py) against a per-token loop
written from the semantics of docs/mhc.md section 10: values and gradients, float64 gradcheck on small shapes; the
model trains, decodes like its full forward, and the unsupported combinations are refused in one line."""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import ConfigError, load_config
from mhc_train.model.connections import build_connection
from mhc_train.ops import mhc_coefficients_deepseek_ref, mhc_coefficients_ref
from tests.support.configs import conn_cfg

C = 6


def _chain(n, n_sites, numerics, dtype=torch.float64, seed=0):
    """A connection and n_sites sites off their init (random phi, biases, gates), plus per-site sub-layers F_l."""
    cfg = conn_cfg("mhc", type="mhc_single_pass", n_streams=n, numerics=numerics, phi_init_std=0.5)
    conn = build_connection(cfg)
    g = torch.Generator().manual_seed(seed)
    sites = []
    for k in range(n_sites):
        site = conn.site(C, k).to(dtype)
        with torch.no_grad():
            for p in site.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)
        sites.append(site)
    ws = [torch.randn(C, C, generator=g, dtype=dtype) / C**0.5 for _ in range(n_sites)]
    return conn, sites, ws


def _model(conn, sites, ws, h):
    state = conn.expand(h)  # [B, T, n+1, C]
    for site, w in zip(sites, ws):
        state = site(state, lambda f, w=w: torch.tanh(f @ w))
    return conn.collapse(state)  # [B, T, C]


def _oracle(sites, ws, h, numerics):
    """The semantics, one token at a time: site l reads x_l with the mix m_l of site l-1 (m_0 = e_0), writes
    x_{l+1} = H_res x_l + post F(m_l . x_l), and hands on its own H_pre; the output is m_L . x_L."""
    coeffs = mhc_coefficients_deepseek_ref if numerics == "deepseek_v4" else mhc_coefficients_ref
    out = torch.empty_like(h)
    n = sites[0].n
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t].expand(n, C)  # [n, C]
            mix = torch.zeros(n, dtype=h.dtype)
            mix[0] = 1.0
            for site, w in zip(sites, ws):
                cfg = site.cfg
                extra = (cfg.t_max, cfg.eps, cfg.hc_eps) if numerics == "deepseek_v4" else (cfg.t_max, cfg.eps)
                h_pre, h_post, h_res = coeffs(x, site.phi, site.alpha, site.bias, *extra)
                y = torch.tanh((mix @ x) @ w)  # F reads with the previous site's mix
                x = h_res @ x + h_post[:, None] * y[None, :]
                mix = h_pre  # the next site's read mix
            out[b, t] = mix @ x
    return out


@pytest.mark.parametrize("numerics", ["deepseek_v4", "paper"])
@pytest.mark.parametrize("n", [2, 4])
def test_single_pass_matches_the_per_token_oracle_values_and_gradients(n, numerics):
    conn, sites, ws = _chain(n, 4, numerics)
    h = torch.randn(2, 3, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn(2, 3, C, dtype=torch.float64)
    params = [h, *(p for s in sites for p in s.parameters())]
    ours = _model(conn, sites, ws, h)
    theirs = _oracle(sites, ws, h, numerics)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (ours - theirs).abs().max()
    g_ours = torch.autograd.grad((ours * upstream).sum(), params)
    g_theirs = torch.autograd.grad((theirs * upstream).sum(), params)
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()


def test_the_lag_is_real():
    """Reading with the site's own H_pre (ordinary mHC) instead of the previous site's mix gives another function."""
    conn, sites, ws = _chain(2, 3, "deepseek_v4")
    h = torch.randn(1, 2, C, dtype=torch.float64)
    with torch.no_grad():
        lagged = _model(conn, sites, ws, h)
        state = conn.expand(h)
        for site, w in zip(sites, ws):  # unlagged: F reads with this site's own H_pre
            x = state[..., : site.n, :]
            h_pre, h_post, h_res = site.coefficients(x)
            y = torch.tanh((h_pre.unsqueeze(-2) @ x).squeeze(-2) @ w)
            state = torch.cat([h_res @ x + h_post.unsqueeze(-1) * y.unsqueeze(-2), state[..., -1:, :]], -2)
    assert (lagged - conn.collapse(state)).abs().max() > 1e-3


def test_single_pass_gradcheck():
    conn, sites, ws = _chain(2, 2, "deepseek_v4", seed=3)
    for s in sites:
        s.cfg.t_max = 3  # a short Sinkhorn keeps gradcheck fast; the arithmetic is the same
    h = torch.randn(1, 2, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: _model(conn, sites, ws, h), (h,))
    phi = sites[0].phi
    assert torch.autograd.gradcheck(lambda p: _swap(sites[0], "phi", p, lambda: _model(conn, sites, ws, h)), (phi,))


def _swap(site, name, value, run):
    """run() with site.<name> replaced by `value` (a differentiable leaf for gradcheck)."""
    old = site._parameters.pop(name)
    setattr(site, name, value)
    try:
        return run()
    finally:
        delattr(site, name)
        site._parameters[name] = old


def test_single_pass_model_trains_and_decodes_like_its_full_forward():
    from mhc_train.infer.generate import Decoder
    from mhc_train.model.transformer import build_model
    from tests.support.configs import tiny_model_cfg

    model = build_model(tiny_model_cfg(), conn_cfg("mhc", type="mhc_single_pass", numerics="deepseek_v4"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        full = model(tokens)
    dec = Decoder(model)
    cache = dec.new_cache(2, 12)
    steps = [dec.forward(tokens[:, :5], cache, all_logits=True)]
    steps += [dec.forward(tokens[:, t : t + 1], cache, all_logits=True) for t in range(5, 12)]
    err = (torch.cat(steps, 1) - full).abs().max().item()
    assert err <= 1e-5, f"cached vs full logits: max abs diff {err:.3e}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("connection.collapse=learned", "connection.collapse"),
        ("connection.h_res=identity", "connection.h_res"),
    ],
)
def test_unsupported_single_pass_combinations_are_refused_in_one_line(override, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(["model=test", "train=test", "connection=mhc_single_pass", override])
    assert "\n" not in str(err.value)


def test_single_pass_on_the_triton_backend_equals_torch():
    """The arm's unfused site ops on the triton backend (interpreter on CPU): values and every gradient."""
    pytest.importorskip("triton")
    results = {}
    for backend in ("torch", "triton"):
        conn, sites, ws = _chain(4, 2, "deepseek_v4", dtype=torch.float32, seed=4)
        for s in sites:
            s.backend = backend
        h = torch.randn(2, 5, C, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out = _model(conn, sites, ws, h)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
        results[backend] = [out, h.grad, *(p.grad for s in sites for p in s.parameters())]
    for got, want in zip(results["triton"], results["torch"]):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-5, f"triton vs torch: relative error {err:.3e}"


@pytest.mark.parametrize("mode, backend", [("mhc", "torch"), ("full", "torch"), ("mhc", "triton")])
def test_recompute_gradients_are_bit_identical(mode, backend):
    """The packed state through selective / full recomputation (the arm's step does the packing): the same bits.
    triton: the arm's fused kernels (interpreter on CPU), replayed and linked again in the recomputed backward."""
    from mhc_train.model.transformer import build_model
    from mhc_train.parallel import apply_recompute
    from tests.support.configs import tiny_model_cfg
    from tools.measure import next_token_loss

    if backend == "triton":
        pytest.importorskip("triton")
    cfg = conn_cfg("mhc", type="mhc_single_pass", numerics="deepseek_v4", phi_init_std=0.3, backend=backend)
    model = build_model(tiny_model_cfg(n_layer=2), cfg, seed=0)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = next_token_loss(model, tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    for block in (1, 3) if backend == "torch" else (1,):
        apply_recompute(model, mode, block)
        loss, got = grads()
        assert torch.equal(loss, ref_loss)
        for name in ref:
            assert torch.equal(got[name], ref[name]), f"{mode} L_r={block}: {name}"
    apply_recompute(model, "none")


def _fused_chain_model():
    """A 2-layer single-pass model on the triton backend (deepseek_v4 numerics, phi large enough to matter) and a
    batch: the model the cross-site fusion tests run."""
    from mhc_train.model.transformer import build_model
    from tests.support.configs import tiny_model_cfg

    cfg = conn_cfg("mhc", type="mhc_single_pass", numerics="deepseek_v4", phi_init_std=0.3, backend="triton")
    model = build_model(tiny_model_cfg(n_layer=2), cfg, seed=0)
    return model, torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))


def _fused_step(model, tokens, capture_backward: bool):
    """One forward and backward: (fused write launches, plain read launches, loss, gradients), the launches counted
    over the forward (and the backward, with `capture_backward`: recompute's replays)."""
    from mhc_kernels.utils import capture
    from tools.measure import next_token_loss

    model.zero_grad(set_to_none=True)
    with capture() as launches:
        loss = next_token_loss(model, tokens)
        if capture_backward:
            loss.backward()
    if not capture_backward:
        loss.backward()
    names = [launch.name for launch in launches]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return names.count("_sp_write_read_fwd_kernel"), names.count("_sp_read_fwd_kernel"), loss.detach(), grads


def test_cross_site_fusion_runs_at_every_inner_boundary_with_the_unfused_bits():
    """triton (interpreter): each site's write also computes the next site's read (one fused kernel per inner
    sub-layer boundary, 2L - 1 of them; only the first site reads on its own), and loss and every gradient equal the
    unfused model's (the sites' successors forgotten) bit for bit; a pipeline stage's last site writes unfused.
    Recompute's replays run the unfused pair:
    test_recompute_gradients_are_bit_identical[mhc-triton] compares them with this fused model."""
    pytest.importorskip("triton")
    from mhc_kernels.utils import capture

    model, tokens = _fused_chain_model()

    def run():
        return _fused_step(model, tokens, capture_backward=False)

    fused, reads, loss, grads = run()
    assert (fused, reads) == (3, 1)
    for _, site in model.sites():
        site._next = ()
    fused, reads, ref_loss, ref = run()
    assert (fused, reads) == (0, 4)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name
    # a pipeline stage's last site: the next site's phi is on another rank (here: meta), so its write is the plain one
    from mhc_train.parallel.pipeline import cut_stage

    model.conn.chain_sites([site for _, site in model.sites()])
    stage = cut_stage(model, 0, 2)
    model.layers["1"].to("meta")
    with torch.no_grad(), capture() as launches:
        stage(tokens)
    assert [launch.name for launch in launches].count("_sp_write_read_fwd_kernel") == 1


@pytest.mark.slow  # a torchrun launch of 2 gloo ranks, and the one-process reference
@pytest.mark.parametrize(  # 1F1B only with MHC_TRAIN_MATRIX_FULL=1 (this test-time budget)
    "schedule", [pytest.param("1f1b", marks=pytest.mark.matrix_full), "dualpipev"]
)
def test_pipeline_matches_single_process(prepared_data, reference_runs, tmp_path, schedule):
    """PP=2: the packed state (streams and the carried mix) crosses the stage boundary; loss for loss, every gradient
    of step 1 and the weights after 3 steps equal one process (DualPipeV: 4 stages of one layer, split backward)."""
    from tests.support import launch
    from tests.support.configs import run_overrides
    from tests.support.numerics import assert_close_runs

    common = {"train.max_steps": 3, "train.batch_size": 8, "checkpoint.every": 0, "train.threads": 1}
    common.update({"train.dump_grads_at": 1, "model.n_layer": 4, "connection": "mhc_single_pass"})
    ref, pp = reference_runs(**common), tmp_path / "pp"
    overrides = {"parallel.pp": 2, "parallel.pp_schedule": schedule}
    launch.run(launch.torchrun_cmd(run_overrides(prepared_data, pp, **common, **overrides)))
    assert_close_runs(pp, ref, 3)


def test_recompute_computes_no_read_ahead_that_no_site_takes():
    """triton (interpreter): under recompute=full with L_r = 2 (two groups of two sites) every site read, in the forward
    and in each backward replay, is served by exactly one launch (its own read kernel or the previous site's fused
    write): a group's last site computes no read ahead (the next group gets a new tensor, and the replays run the
    groups last first), and no prefetch is left on any site after the step; loss and gradients equal the plain fused
    model's bit for bit. recompute=mhc replays the halves: no fused write at all."""
    pytest.importorskip("triton")
    from mhc_train.parallel import apply_recompute

    model, tokens = _fused_chain_model()

    def run():
        out = _fused_step(model, tokens, capture_backward=True)
        assert all(site.fetched is None for _, site in model.sites())
        return out

    *_, ref_loss, ref = run()
    apply_recompute(model, "full", 2)
    fused, reads, loss, grads = run()
    assert (fused, reads) == (4, 4)  # 8 site reads: 4 in the forward, 4 in the replays; 2 fused per pass
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name
    apply_recompute(model, "mhc", 2)
    assert run()[0] == 0
    apply_recompute(model, "none")
    assert run()[:2] == (3, 1)  # the plain model's chain is whole again
