"""mHC init variants (issue 15): the symmetric init is blind to H_res at phi = 0, the HC-like one breaks the symmetry."""

import pytest
import torch

from mhc_train.config import ConnectionConfig, OptimConfig
from mhc_train.model import build_model
from mhc_train.optim import build_optimizer
from mhc_train.train.diagnostics import connection_diagnostics
from tests.support.configs import conn_cfg, tiny_model_cfg

HC_LIKE = dict(read_init="one_hot", read_logit=4.0, b_res_init="identity", b_res_diag=4.0)


def _coeffs_at_step0(conn: ConnectionConfig, tokens):
    model = build_model(tiny_model_cfg(), conn, seed=0)
    seen = {}
    handles = [
        s.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, m.coefficients(a[0])))
        for name, s in model.sites()
    ]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return seen


def test_init_variants_give_the_intended_coefficients_at_step0():
    tokens = torch.randint(0, 256, (2, 8))
    sym = _coeffs_at_step0(conn_cfg("mhc", phi_init_std=0.0), tokens)
    h_pre, h_post, h_res = sym["0.ffn"]
    assert torch.allclose(h_pre, torch.full_like(h_pre, 0.5)) and torch.allclose(h_post, torch.ones_like(h_post))
    assert torch.allclose(h_res, torch.full_like(h_res, 0.25), atol=1e-6)  # J/n
    hcl = _coeffs_at_step0(conn_cfg("mhc", phi_init_std=0.0, **HC_LIKE), tokens)
    for k, name in enumerate(hcl):  # sites in order: 0.attn, 0.ffn, 1.attn, 1.ffn
        h_pre, h_post, h_res = hcl[name]
        on = torch.sigmoid(torch.tensor(4.0))
        expected = torch.full((4,), 1 - on.item()).index_fill_(0, torch.tensor([k % 4]), on.item())
        assert torch.allclose(h_pre[0, 0], expected, atol=1e-6), (name, h_pre[0, 0])
        assert torch.allclose(h_post, torch.ones_like(h_post))
        assert torch.allclose(h_res[0, 0].diagonal(), torch.full((4,), 0.948), atol=1e-3)  # e^4 / (e^4 + 3)
        assert torch.allclose(h_res.sum(-1), torch.ones(h_res.shape[:-1]), atol=1e-5)


def test_bad_read_init_names_the_choices():
    with pytest.raises(Exception, match="read_init"):
        build_model(tiny_model_cfg(), conn_cfg("mhc", read_init="onehot"))


def _train_steps(conn: ConnectionConfig, steps: int):
    """A few AdamW steps on random tokens; returns the model, the H_res logit gradients of the last step and the
    stream spread (max over streams of |x_i - x_0|) at the last site's input."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(), conn, seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    tokens = torch.randint(0, 256, (4, 16))
    for _ in range(steps):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads = [s.bias.grad[8:].abs().max().item() for _, s in model.sites()]
        opt.step()
    spread = {}
    last = model.sites()[-1][1]
    h = last.register_forward_pre_hook(lambda m, a: spread.__setitem__("x", (a[0] - a[0][..., :1, :]).abs().max()))
    with torch.no_grad():
        model(tokens[:, :-1])
    h.remove()
    return model, grads, spread["x"].item()


def test_symmetric_init_at_phi0_never_moves_h_res_and_hc_like_does():
    tokens = torch.randint(0, 256, (2, 8))
    sym, sym_grads, sym_spread = _train_steps(conn_cfg("mhc", phi_init_std=0.0), 2)
    assert max(sym_grads) == 0.0 and sym_spread == 0.0  # identical streams, Sinkhorn-blind gradient
    d = connection_diagnostics(sym, tokens)
    assert d["h_res_dist_uniform_mean"] < 1e-6 and d["h_res_dist_identity_mean"] == pytest.approx(3**0.5, abs=1e-5)
    hcl, hcl_grads, hcl_spread = _train_steps(conn_cfg("mhc", phi_init_std=0.0, **HC_LIKE), 2)
    # streams differ after one step and the H_res logits get a gradient (small: the first site always reads the
    # replicated embedding, and a diagonal logit of 4 saturates Sinkhorn; Adam rescales it to an lr-sized step)
    assert max(hcl_grads[1:]) > 1e-10 and hcl_spread > 1e-5
    start = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("mhc", **HC_LIKE), seed=0), tokens)
    moved = connection_diagnostics(hcl, tokens)
    assert moved["h_res_dist_identity_mean"] != pytest.approx(start["h_res_dist_identity_mean"], abs=1e-5)


def test_diagnostics_say_n_a_where_a_quantity_has_no_meaning():
    tokens = torch.randint(0, 256, (1, 8))
    res = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("residual")), tokens)
    assert res["h_res_dist_uniform_mean"] is None and res["sinkhorn_col_err_max"] is None
    hc = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("hc")), tokens)
    assert hc["sinkhorn_col_err_max"] is None and hc["h_res_dist_identity_mean"] < 0.1  # A_r = I + small terms
    ident = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("mhc_identity")), tokens)
    assert ident["sinkhorn_col_err_max"] is None and ident["h_res_dist_identity_mean"] == 0.0
    mhc = connection_diagnostics(build_model(tiny_model_cfg(), conn_cfg("mhc")), tokens)
    assert mhc["sinkhorn_col_err_max"] is not None and mhc["h_res_dist_uniform_mean"] < 0.05


def test_connection_lr_mult_and_weight_decay_groups():
    model = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=0)
    groups = {g["name"]: g for g in build_optimizer(model, OptimConfig(lr=1e-2)).param_groups}
    assert set(groups) == {"decay", "no_decay"}  # the default layout is unchanged
    opt = build_optimizer(model, OptimConfig(lr=1e-2, connection_lr_mult=0.0, connection_weight_decay=False))
    groups = {g["name"]: g for g in opt.param_groups}
    phi = model.sites()[0][1].phi
    assert any(p is phi for p in groups["conn_decay"]["params"]) and groups["conn_decay"]["weight_decay"] == 0.0
    assert groups["conn_no_decay"]["lr"] == 0.0 and groups["decay"]["lr"] == 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "_conn." in n}
    tokens = torch.randint(0, 256, (2, 9))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "_conn." in n)  # frozen
