"""The three connection types inside the model: equivalences at init, gradient flow, symmetry breaking, config errors."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mhc_train.config import ConfigError, ConnectionConfig, ModelConfig
from mhc_train.model import build_model, no_weight_decay
from tests.support.configs import conn_cfg, shakespeare_bytes, tiny_model_cfg
from tests.support.numerics import assert_close


def _copy_shared_weights(src, dst):
    """Give dst the same F weights (embedding, attention, FFN, norms, head) as src."""
    missing, _ = dst.load_state_dict(src.state_dict(), strict=False)
    assert all("_conn." in k for k in missing), missing


def _tokens(B=2, T=24):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))


# Sum-collapse scales the final norm's input by n (and mHC's read by n/2); RMSNorm removes both up to its eps, so the
# equivalence tests use a negligible eps to show exact equality.
EXACT = dict(norm_eps=1e-14)


def test_hc_at_init_equals_prenorm_baseline():
    base = build_model(tiny_model_cfg(**EXACT), conn_cfg("residual"), seed=3).double()
    tokens = _tokens()
    for dynamic in (False, True):
        hc = build_model(tiny_model_cfg(**EXACT), conn_cfg("hc", hc_dynamic=dynamic), seed=7).double()
        _copy_shared_weights(base, hc)
        assert_close(hc(tokens), base(tokens), atol=1e-9, what=f"HC(dynamic={dynamic}) vs residual logits")


def test_mhc_with_zero_phi_equals_prenorm_baseline():
    base = build_model(tiny_model_cfg(**EXACT), conn_cfg("residual"), seed=3).double()
    tokens = _tokens()
    for b_res in ("uniform", "identity"):
        mhc = build_model(tiny_model_cfg(**EXACT), conn_cfg("mhc", phi_init_std=0.0, b_res_init=b_res), seed=7).double()
        _copy_shared_weights(base, mhc)
        assert_close(mhc(tokens), base(tokens), atol=1e-9, what=f"mHC(phi=0, b_res={b_res}) vs residual logits")


def test_mhc_with_random_phi_differs_from_baseline():
    """The equivalence test above can fail: with phi != 0 the logits move."""
    base = build_model(tiny_model_cfg(), conn_cfg("residual"), seed=3).double()
    mhc = build_model(tiny_model_cfg(), conn_cfg("mhc", phi_init_std=0.5), seed=7).double()
    _copy_shared_weights(base, mhc)
    assert (mhc(_tokens()) - base(_tokens())).abs().max() > 1e-4


def _perturb_connection_params(model, scale=0.3):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_conn." in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("arm", ["hc", "mhc", "mhc_identity"])
def test_gradients_reach_every_connection_parameter(arm):
    model = build_model(tiny_model_cfg(), conn_cfg(arm), seed=0).double()
    _perturb_connection_params(model)  # away from init, where some terms (tanh(0 W)) have zero gradient
    logits = model(_tokens())
    (logits * torch.randn_like(logits)).sum().backward()
    conn_params = [(n, p) for n, p in model.named_parameters() if "_conn." in n]
    assert conn_params
    for name, p in conn_params:
        assert p.requires_grad, f"{name} is frozen"
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        if arm.startswith("mhc") and name.endswith("phi"):
            n = model.n_streams
            blocks = {"pre": p.grad[:, :n], "post": p.grad[:, n : 2 * n], "res": p.grad[:, 2 * n :]}
            for blk, gr in blocks.items():
                assert gr.numel() == 0 or gr.abs().sum() > 0, f"{name}[{blk}] gets a zero gradient"
        else:
            assert (p.grad.abs() > 0).any(), f"{name} gets a zero gradient (never applied?)"
    if arm == "mhc_identity":
        site = model.layers["0"].attn_conn
        assert site.phi.shape[1] == 2 * model.n_streams and site.alpha.numel() == 2


@pytest.mark.parametrize("arm", ["hc", "mhc"])
def test_h_res_is_applied(arm):
    """Changing only H_res's parameters changes the output (a port that never applies H_res fails here)."""
    model = build_model(tiny_model_cfg(), conn_cfg(arm), seed=0).double()
    _perturb_connection_params(model)
    tokens = _tokens()
    before = model(tokens)
    with torch.no_grad():
        for _, site in model.sites():
            if arm == "mhc":
                site.bias[2 * model.n_streams :] += torch.randn(model.n_streams**2, dtype=torch.float64) * 2
            else:
                site.static_alpha_r.add_(torch.randn_like(site.static_alpha_r))
    assert (model(tokens) - before).abs().max() > 1e-6


def _stream_spread(model, tokens):
    """Max over sites of the largest difference between any stream and stream 0, relative to the stream norm."""
    spreads = []

    def hook(mod, args, out):
        spreads.append(((out - out[..., :1, :]).abs().max() / out.abs().max()).item())

    handles = [site.register_forward_hook(hook) for _, site in model.sites()]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return max(spreads)


def _train_steps(model, data, steps=6, B=4, T=32):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        x = torch.stack([data[i : i + T] for i in idx])
        y = torch.stack([data[i + 1 : i + T + 1] for i in idx])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("arm", ["hc", "mhc"])
def test_streams_diverge_after_training_on_real_text(arm):
    data = shakespeare_bytes()
    model = build_model(tiny_model_cfg(), conn_cfg(arm), seed=0)
    _train_steps(model, data)
    spread = _stream_spread(model, data[:64].view(2, 32))
    print(f"{arm}: relative stream spread after 6 steps {spread:.3e}")
    assert spread > 1e-3


def test_zero_phi_with_symmetric_biases_keeps_streams_identical():
    """The symmetry trap of spec section 2: this is why phi_init_std must be > 0."""
    data = shakespeare_bytes()
    model = build_model(tiny_model_cfg(), conn_cfg("mhc", phi_init_std=0.0), seed=0)
    _train_steps(model, data)
    assert _stream_spread(model, data[:64].view(2, 32)) < 1e-5


def test_weight_decay_excludes_norms_gates_and_hc_static_parts():
    model = build_model(tiny_model_cfg(), conn_cfg("hc"), seed=0)
    no_wd = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    assert "layers.0.attn_conn.static_alpha_r" in no_wd and "layers.0.attn_norm.weight" in no_wd
    assert "layers.0.attn.wq.weight" not in no_wd and "layers.0.attn_conn.dyn_proj" not in no_wd
    mhc = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=0)
    no_wd = {n for n, p in mhc.named_parameters() if no_weight_decay(n, p)}
    assert {"layers.1.ffn_conn.alpha", "layers.1.ffn_conn.bias"} <= no_wd and "layers.1.ffn_conn.phi" not in no_wd


def test_hc_out_proj_flag_scales_init():
    stds = {}
    for mode in ("none", "mul_sqrt_n", "div_sqrt_n"):
        m = build_model(tiny_model_cfg(dim=128), conn_cfg("hc", hc_out_proj_init=mode), seed=0)
        stds[mode] = m.layers["0"].ffn.w2.weight.std().item()
    assert stds["mul_sqrt_n"] / stds["none"] == pytest.approx(2.0, rel=0.05)
    assert stds["div_sqrt_n"] / stds["none"] == pytest.approx(0.5, rel=0.05)


def test_construction_draws_nothing_from_global_rng_and_works_on_meta():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    m = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=0, device="meta")
    assert torch.equal(state, torch.get_rng_state())
    assert m.layers["1"].ffn_conn.phi.is_meta
    a = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=11)
    b = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=11)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


BAD = [
    ("connection", dict(type="dense"), r"connection\.type='dense'.*residual, hc, mhc"),
    ("connection", dict(type="mhc", n_streams=0), r"connection\.n_streams=0.*>= 1"),
    ("connection", dict(type="residual", n_streams=4), r"connection\.n_streams=4.*exactly 1 stream"),
    ("connection", dict(type="mhc", t_max=0), r"connection\.t_max=0.*>= 1"),
    ("connection", dict(type="mhc", h_res="transpose"), r"connection\.h_res='transpose'.*sinkhorn, identity"),
    ("connection", dict(type="mhc", b_res_init="random"), r"connection\.b_res_init='random'.*uniform, identity"),
    ("connection", dict(type="hc", hc_out_proj_init="x"), r"connection\.hc_out_proj_init='x'"),
    ("connection", dict(type="mhc", backend="cuda"), r"connection\.backend='cuda'.*torch, triton, auto"),
    ("model", dict(dim=30, n_head=4), r"model\.n_head=4.*must divide model\.dim=30 \(or set model\.head_dim\)"),
    ("model", dict(n_layer=0), r"model\.n_layer=0.*>= 1"),
    ("model", dict(n_kv_head=3), r"model\.n_kv_head=3.*must divide model\.n_head=4"),
]


@pytest.mark.parametrize("group,kw,pattern", BAD, ids=[f"{g}-{next(iter(k.values()))}" for g, k, _ in BAD])
def test_bad_config_fails_at_build_naming_key(group, kw, pattern):
    model_cfg, cc = tiny_model_cfg(), ConnectionConfig(backend="torch")
    if group == "model":
        model_cfg = dataclasses.replace(model_cfg, **kw)
    else:
        cc = dataclasses.replace(cc, **kw)
    with pytest.raises(ConfigError, match=pattern):
        build_model(model_cfg, cc)


def test_residual_has_one_stream_and_no_connection_params():
    m = build_model(ModelConfig(**{**tiny_model_cfg().__dict__}), conn_cfg("residual"))
    assert m.n_streams == 1 and not [n for n, _ in m.named_parameters() if "_conn." in n]


def test_each_module_initialises_from_its_own_seed_so_a_part_needs_nothing_else():
    """A module's initial values depend only on (seed, its name): a second model with a block removed, or the
    model's parameters written through a custom `write` (how the sharded engines keep their slice), get the same
    values, and another seed gives others."""
    import torch

    from mhc_train.config import load_config
    from mhc_train.model import build_model

    cfg = load_config(["model=test", "train=test", "connection=mhc"])
    a = build_model(cfg.model, cfg.connection, seed=3)
    b = build_model(cfg.model, cfg.connection, device="meta")
    del b.layers["0"]  # like a pipeline stage that does not hold block 0
    b.to_empty(device="cpu")
    seen = {}
    b.init_weights(3, write=lambda p, v: (p.copy_(v), seen.__setitem__(id(p), v.shape)))
    for name, p in b.named_parameters():
        assert torch.equal(p, a.state_dict()[name]), name
    assert len(seen) == len(list(b.parameters()))
    c = build_model(cfg.model, cfg.connection, seed=4)
    assert not torch.equal(c.layers["1"].attn.wq.weight, a.layers["1"].attn.wq.weight)
    with pytest.raises(RuntimeError, match="meta device"):
        build_model(cfg.model, cfg.connection, device="meta").init_weights(0)
