"""The stability diagnostics on the single-pass arm (issue 27; docs/mhc.md section 10): its H_res chain is the other
mHC arms' (x_{l+1} = H_res_l x_l + post_l^T F_l), only the read is lagged, so the composite gain is the product of
the H_res the sites apply. `SiteProbe` sees the packed state [B, T, n+1, C] (the mix in row n): it must take n from
the coefficients, not from the state, and compose the H_res in the orientation the write applies them."""

from __future__ import annotations

import torch

from mhc_train.model import build_model
from mhc_train.model.single_pass import pack_state
from mhc_train.train.diagnostics import SiteProbe, amax_gains, connection_diagnostics
from tests.support.configs import conn_cfg, tiny_model_cfg


def _single_pass_model(n: int):
    cfg = conn_cfg("mhc", type="mhc_single_pass", n_streams=n, numerics="deepseek_v4", phi_init_std=0.5)
    model = build_model(tiny_model_cfg(n_layer=3), cfg, seed=1).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, site in model.sites():
            site.bias[2 * n :] = torch.randn(n * n, generator=g, dtype=torch.float64) * 3  # H_res far from J/n and I
        for layer in model.layers.values():  # every F's output projection zero: F = 0, the streams see H_res only
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear) and module.out_features == model.cfg.dim:
                    module.weight.zero_()
    return model


def test_single_pass_composite_is_the_product_of_the_applied_h_res():
    n, dim = 4, tiny_model_cfg().dim
    model = _single_pass_model(n)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 6, n, dim, generator=g, dtype=torch.float64)  # distinct streams: the product, not its row sums
    mix0 = torch.softmax(torch.randn(2, 6, n, generator=g, dtype=torch.float64), -1)
    probe = SiteProbe()
    with probe.capture(model):
        out = model.run_blocks(pack_state(x0, mix0), plain=True)
    prod = probe.forward(None)  # H_{L-1} ... H_0 [B, T, n, n], as the probe composed it
    assert prod.shape == (2, 6, n, n)
    assert torch.allclose(out[..., :n, :], prod @ x0, rtol=1e-10, atol=1e-10)  # what the stream went through
    assert not torch.allclose(prod, prod.transpose(-1, -2), atol=1e-3)  # so a transposed chain would fail above
    last = probe.sites[f"{model.cfg.n_layer - 1}.ffn"]
    assert last["composite_fwd_gain"] == amax_gains(prod)[0]
    probe.backward(None)
    assert probe.sites["0.attn"]["composite_bwd_gain"] == amax_gains(prod)[1]


def test_single_pass_diagnostics_report_per_site_statistics_of_n_streams():
    model = _single_pass_model(2)
    d = connection_diagnostics(model, torch.randint(0, 256, (2, 8)))
    assert len(d["sites"]) == 6
    site = d["sites"]["0.attn"]
    assert site["sinkhorn_col_err"] is not None and site["h_pre_max"] <= 1 + 1e-5  # a projected H_res; H_pre of n
    # six doubly stochastic H_res up to Sinkhorn's column error (peaked logits: 20 iterations leave ~2e-2)
    assert d["composite_bwd_gain_max"] <= (1.0 + d["sinkhorn_col_err_max"]) ** 6 + 1e-9
