import pytest
import torch

from mhc_train.config import ScheduleConfig
from mhc_train.model import build_model
from mhc_train.optim import lr_multiplier
from mhc_train.train.diagnostics import amax_gains, connection_diagnostics
from tests.support.configs import conn_cfg, tiny_model_cfg


def test_amax_gain_of_identity_is_one():
    assert amax_gains(torch.eye(4).expand(3, 5, 4, 4)) == (1.0, 1.0)


def test_amax_gain_of_a_known_matrix_is_its_row_and_column_sums():
    m = torch.tensor([[0.5, -0.2], [0.1, 0.9]])  # abs row sums 0.7, 1.0; abs column sums 0.6, 1.1
    fwd, bwd = amax_gains(m)
    assert fwd == pytest.approx(1.0) and bwd == pytest.approx(1.1)
    fwd, bwd = amax_gains(torch.stack([m, torch.eye(2)]))  # averaged over tokens
    assert fwd == pytest.approx(1.0) and bwd == pytest.approx(1.05)


def test_diagnostics_on_models():
    tokens = torch.randint(0, 256, (2, 16))
    res = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("residual")), tokens)
    assert res["composite_bwd_gain_max"] == 1.0 and res["min_col_sum"] == 1.0
    hc = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("hc")), tokens)
    assert hc["composite_fwd_gain_max"] == pytest.approx(1.0, abs=0.1)  # A_r = I plus small dynamic terms
    model = build_model(tiny_model_cfg(), conn_cfg("mhc"))
    with torch.no_grad():
        for _, site in model.sites():
            site.bias[2 * 4 :] = torch.randn(16) * 3
    mhc = connection_diagnostics(model, tokens)
    assert len(mhc["sites"]) == 4
    # doubly stochastic up to Sinkhorn's column error: composites stay near 1, unlike HC's unconstrained products
    assert mhc["composite_bwd_gain_max"] < 1 + 4 * mhc["sinkhorn_col_err_max"] + 1e-6
    first = mhc["sites"]["0.attn"]
    assert first["composite_fwd_gain"] == first["fwd_gain"]


def test_composite_gain_of_unconstrained_mixing_grows():
    model = build_model(tiny_model_cfg(n_layer=3), conn_cfg("hc", hc_dynamic=False))
    with torch.no_grad():
        for _, site in model.sites():
            site.static_alpha_r.fill_(0.5)  # every column sums to 2: the backward gain doubles per site
    d = connection_diagnostics(model, torch.randint(0, 256, (1, 8)))
    assert d["single_bwd_gain_max"] == pytest.approx(2.0)
    assert d["composite_bwd_gain_max"] == pytest.approx(2.0**6)


def test_schedules():
    cos = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cos) == pytest.approx(0.1) and lr_multiplier(9, 100, cos) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, cos) == pytest.approx(0.1)
    step = ScheduleConfig(name="step", warmup_steps=0)
    assert [lr_multiplier(s, 100, step) for s in (0, 79, 80, 89, 90, 99)] == [1, 1, 0.316, 0.316, 0.1, 0.1]


def test_diagnostics_keep_no_stream_state_beyond_the_current_site():
    """Each site's coefficients are taken as the forward reaches it: by the last site, no earlier site's [B, T, n, C]
    input is still alive (the old hook kept every one, 26 GB at 1.3B)."""
    import gc
    import weakref

    model = build_model(tiny_model_cfg(n_layer=4), conn_cfg("mhc"), seed=0)
    seen, alive_at_last = [], []
    sites = [s for _, s in model.sites()]

    def spy(mod, args):
        gc.collect()
        if mod is sites[-1]:
            alive_at_last.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(args[0]))

    handles = [s.register_forward_pre_hook(spy) for s in sites]
    try:
        connection_diagnostics(model, torch.randint(0, 256, (2, 16)))
    finally:
        for h in handles:
            h.remove()
    assert alive_at_last == [1], alive_at_last  # only the input of the site before the last, being consumed now
