"""`connection.numerics: deepseek_v4`, the learned collapse and the DeepSeek name mapping against transformers' own
`DeepseekV4HyperConnection` and `DeepseekV4HyperHead` (transformers.models.deepseek_v4), both directions.

Parity: their module's (post, comb, collapsed) and the stream update their decoder layer computes, `post (x) F +
comb^T x`, against our site's (h_post, h_res, F's input) and `site(x, F)`. fp32: 1e-5 relative. float64: their forward
casts to fp32 with `.float()`; with that cast made the identity (patched for their call only) every op of theirs runs
in float64, and the two agree to 1e-12. Negative controls (float64, where 1e-12 leaves no room): an untransposed res
block, a Sinkhorn starting with the other normalisation, and missing epsilons each break parity.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from mhc_train.model import deepseek_map
from mhc_train.model.connections import LearnedCollapse, MHCSite
from mhc_train.ops import backends
from mhc_train.ops import deepseek as ds_ops
from tests.support.configs import conn_cfg

ds = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
C, ITERS, EPS, HC_EPS = 8, 20, 1e-6, 1e-6
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CASES = [(n, peaked) for n in (2, 4, 8) for peaked in (False, True)]


def _config(n):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(hidden_size=C, hc_mult=n, hc_sinkhorn_iters=ITERS, hc_eps=HC_EPS, rms_norm_eps=EPS)


def _theirs_params(n, peaked, g):
    """DeepSeek-layout (fn, base, scale); peaked: logits of tens, where Sinkhorn does not converge in 20 rounds."""
    K, s = n * n + 2 * n, (8.0 if peaked else 0.5)
    return torch.randn(K, n * C, generator=g) * s, torch.randn(K, generator=g) * s, torch.rand(3, generator=g) + 0.5


def _site(n, dtype, **over):
    site = MHCSite(C, n, 0, conn_cfg("mhc", n_streams=n, numerics="deepseek_v4", hc_eps=HC_EPS, eps=EPS, **over))
    return site.to(dtype)


def _run_theirs(module, x, fn):
    """Their decoder layer's site: (post, comb^T, collapsed, post (x) F(collapsed) + comb^T x)."""
    if x.dtype == torch.float64:
        with mock.patch.object(torch.Tensor, "float", lambda t: t):  # their upcasts, made the identity
            post, comb, collapsed = module(x)
    else:
        post, comb, collapsed = module(x)
    out = post.to(x.dtype).unsqueeze(-1) * fn(collapsed).unsqueeze(-2) + torch.matmul(comb.to(x.dtype).mT, x)
    return post, comb.mT, collapsed, out


def _run_ours(site, x, fn):
    h_pre, h_post, h_res = site.coefficients(x)
    return h_post, h_res, site.read(x)[0], site(x, fn)


def _parity(n, peaked, dtype, direction, transpose_res=True, seed=0):
    """Max relative error over (post, H_res, F's input, the update) between their module and our site, with the
    parameters drawn in one layout and mapped into the other."""
    g = torch.Generator().manual_seed(seed + 10 * n + peaked)
    theirs = ds.DeepseekV4HyperConnection(_config(n)).to(dtype)
    site = _site(n, dtype)
    with torch.no_grad():
        if direction == "from_deepseek":
            fn, base, scale = _theirs_params(n, peaked, g)
            mapped = deepseek_map.site_from_deepseek(fn, base, scale, transpose_res)
            src, dst = {"fn": fn, "base": base, "scale": scale}, mapped
        else:  # our layout drawn (phi = a drawn fn transposed), mapped to theirs
            fn, base, scale = _theirs_params(n, peaked, g)
            ours = {"phi": fn.mT.contiguous(), "bias": base, "alpha": scale}
            src, dst = deepseek_map.site_to_deepseek(ours["phi"], ours["bias"], ours["alpha"], transpose_res), ours
        for name, value in src.items():
            getattr(theirs, name).copy_(value)
        for name, value in dst.items():
            getattr(site, name).copy_(value)
    x = torch.randn(2, 3, n, C, generator=g, dtype=dtype)
    w = torch.randn(C, C, generator=g, dtype=dtype) / C**0.5
    fn_ = lambda h: torch.tanh(h @ w)  # noqa: E731
    with torch.no_grad():
        a, b = _run_ours(site, x, fn_), _run_theirs(theirs, x, fn_)
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("direction", ["from_deepseek", "to_deepseek"])
@pytest.mark.parametrize("n, peaked", CASES, ids=[f"n{n}-{'peaked' if p else 'random'}" for n, p in CASES])
def test_site_matches_deepseek_v4_hyper_connection(n, peaked, direction, dtype):
    err = _parity(n, peaked, dtype, direction)
    assert err <= TOL[dtype], f"n={n} peaked={peaked} {direction} {dtype}: relative error {err:.3e}"


def _rows_first(logits, iters=20, eps=1e-6):
    """The negative control: DeepSeek's Sinkhorn started with the other normalisation (our rows first)."""
    return _SINKHORN(logits.mT, iters, eps).mT


@pytest.mark.parametrize("n", [2, 4])
def test_negative_controls_break_parity(n, monkeypatch):
    """Each deliberate mistake must fail the float64 parity check (else the parity test proves nothing)."""
    f64 = torch.float64
    assert _parity(n, False, f64, "from_deepseek") <= TOL[f64]
    assert _parity(n, False, f64, "from_deepseek", transpose_res=False) > 1e-3, "untransposed res block"
    assert _parity(n, False, f64, "to_deepseek", transpose_res=False) > 1e-3, "untransposed res block"
    with monkeypatch.context() as m:
        m.setattr(ds_ops, "sinkhorn_deepseek_ref", _rows_first)
        assert _parity(n, True, f64, "from_deepseek") > 1e-6, "rows-first Sinkhorn"
    with monkeypatch.context() as m:  # the eps of the Sinkhorn denominators and of the softmax start
        m.setattr(ds_ops, "sinkhorn_deepseek_ref", lambda z, iters, eps: _SINKHORN(z, iters, 0.0))
        assert _parity(n, False, f64, "from_deepseek") > 1e-9, "Sinkhorn without eps"
    with monkeypatch.context() as m:  # pre's + hc_eps only
        m.setattr(backends, "mhc_coefficients_deepseek_ref", _without_pre_eps)
        assert _parity(n, False, f64, "from_deepseek") > 1e-9, "pre without + hc_eps"


_SINKHORN = ds_ops.sinkhorn_deepseek_ref


def _without_pre_eps(*args, **kwargs):
    h_pre, h_post, h_res = ds_ops.mhc_coefficients_deepseek_ref(*args, **kwargs)
    return h_pre - HC_EPS, h_post, h_res


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_learned_collapse_matches_deepseek_v4_hyper_head(n, dtype):
    g = torch.Generator().manual_seed(n)
    theirs = ds.DeepseekV4HyperHead(_config(n)).to(dtype)
    ours = LearnedCollapse(C, n, conn_cfg("mhc", n_streams=n, collapse="learned", eps=EPS, hc_eps=HC_EPS)).to(dtype)
    with torch.no_grad():
        params = {"hc_fn": torch.randn(n, n * C, generator=g), "hc_base": torch.randn(n, generator=g), "hc_scale": 2.0}
        params["hc_scale"] = torch.tensor([2.0])
        for name, value in params.items():
            getattr(theirs, name).copy_(value)
        for name, value in deepseek_map.head_from_deepseek(**params).items():
            getattr(ours, name).copy_(value)
        back = deepseek_map.head_to_deepseek(ours.weight, ours.bias, ours.scale)
        assert all(torch.equal(back[k], getattr(theirs, k)) for k in params)
        x = torch.randn(2, 3, n, C, generator=g, dtype=dtype)
        if dtype == torch.float64:
            with mock.patch.object(torch.Tensor, "float", lambda t: t):
                want = theirs(x)
        else:
            want = theirs(x)
        got = ours(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= TOL[dtype], f"n={n} {dtype}: relative error {err:.3e}"


def test_state_dict_mapping_is_lossless_both_ways():
    """A model's state dict to DeepSeek's names and back is bit-identical; the names are DeepSeek's."""
    from mhc_train.model.transformer import build_model
    from tests.support.configs import tiny_model_cfg

    model = build_model(tiny_model_cfg(), conn_cfg("mhc", numerics="deepseek_v4", collapse="learned"), seed=3)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    theirs = deepseek_map.to_deepseek(state)
    assert "model.layers.0.attn_hc.fn" in theirs and "model.layers.1.ffn_hc.scale" in theirs
    assert "model.hc_head.hc_fn" in theirs and not any("_conn." in k for k in theirs)
    n, dim = model.n_streams, model.cfg.dim
    assert theirs["model.layers.0.attn_hc.fn"].shape == ((n + 2) * n, n * dim)
    assert theirs["model.hc_head.hc_fn"].shape == (n, n * dim)
    back = deepseek_map.from_deepseek(theirs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_export_with_deepseek_names_reads_back_bit_identical(prepared_data, tmp_path):
    """`export --hc-names deepseek` writes DeepSeek's names, and mapping them back gives our weights exactly; a
    residual model has no sites to name so (the default names export every arm: tests/infer/test_export_arms.py)."""
    import json

    from safetensors.torch import load_file

    from mhc_train.data.tokenizer import Tokenizer
    from mhc_train.infer.errors import InferenceError
    from mhc_train.infer.export import export
    from mhc_train.infer.load import Loaded
    from mhc_train.model.transformer import build_model
    from tests.support.configs import tiny_model_cfg

    cfg = conn_cfg("mhc", numerics="deepseek_v4", collapse="learned")
    model = build_model(tiny_model_cfg(vocab_size=512), cfg, seed=5)
    loaded = Loaded(model, Tokenizer(prepared_data / "tokenizer.model"), {}, tmp_path / "step.pt", 0)
    residual = Loaded(build_model(tiny_model_cfg(vocab_size=512), conn_cfg("residual")), loaded.tokenizer, {},
                      tmp_path / "step.pt", 0)  # fmt: skip
    with pytest.raises(InferenceError, match="use --hc-names mhc"):
        export(residual, tmp_path / "refused", hc_names="deepseek")
    out = export(loaded, tmp_path / "hf", hc_names="deepseek")
    weights = load_file(out / "model.safetensors")
    assert "model.layers.0.attn_hc.fn" in weights and "model.hc_head.hc_scale" in weights
    back = deepseek_map.from_deepseek(weights)
    state = model.state_dict()
    exported = {k: ("lm_head.weight" if k == "output.weight" else f"model.{k}") for k in state}  # the export's names
    assert back.keys() == set(exported.values())
    assert all(torch.equal(back[exported[k]], v) for k, v in state.items())
    config = json.loads((out / "config.json").read_text())
    assert config["hc_names"] == "deepseek" and config["hc_mult"] == model.n_streams and "auto_map" not in config


def _ds_model(**over):
    from mhc_train.model.transformer import build_model
    from tests.support.configs import tiny_model_cfg

    cfg = conn_cfg("mhc", numerics="deepseek_v4", collapse="learned", phi_init_std=0.5, **over)
    model = build_model(tiny_model_cfg(), cfg, seed=2).eval()
    with torch.no_grad():  # off the init: non-trivial biases and head
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "bias" in name or "collapse_conn" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def test_deepseek_numerics_decode_equals_full_forward():
    from mhc_train.infer.generate import Decoder
    from mhc_train.infer.sites import DeepseekDecodeSite

    model = _ds_model()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    dec = Decoder(model)
    assert all(isinstance(s, DeepseekDecodeSite) for pair in dec.sites for s in pair)
    cache = dec.new_cache(2, 9)
    steps = [dec.forward(tokens[:, :4], cache, all_logits=True)]
    steps += [dec.forward(tokens[:, t : t + 1], cache, all_logits=True) for t in range(4, 9)]
    err = (torch.cat(steps, 1) - full).abs().max().item()
    assert err <= 1e-5, f"cached vs full logits: max abs diff {err:.3e}"


def test_mean_collapse_is_the_sum_over_n():
    from mhc_train.model.connections import Collapse

    x = torch.randn(2, 3, 4, C)
    assert torch.allclose(Collapse("mean")(x), Collapse("sum")(x) / 4, rtol=1e-6, atol=1e-7)


def test_triton_backend_runs_deepseek_numerics_like_torch():
    """The triton backend: its projection kernel (linked: the site's one dx) and the torch tail; values and every
    gradient equal the torch backend's (fp32 rounding: the kernel divides by the RMS after the matmul)."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(1)
    sites = {b: _site(4, torch.float32, backend=b) for b in ("torch", "triton")}
    with torch.no_grad():
        for value in sites["torch"].parameters():
            value.copy_(torch.randn(value.shape, generator=g) * 0.5)
    sites["triton"].load_state_dict(sites["torch"].state_dict())
    x0 = torch.randn(2, 5, 4, C, generator=g)
    w = torch.randn(C, C, generator=g) / C**0.5
    upstream = torch.randn(2, 5, 4, C, generator=g)
    results = {}
    for b, site in sites.items():
        x = x0.clone().requires_grad_()
        out = site(x, lambda h: torch.tanh(h @ w))
        (out * upstream).sum().backward()
        results[b] = [out, x.grad, *(p.grad for p in site.parameters())]
    for got, want in zip(results["triton"], results["torch"]):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-5, f"triton vs torch: relative error {err:.3e}"


def test_learned_collapse_parameters_are_connection_parameters():
    """The head's weights join the connection's optimizer groups (optim.connection_*), as the sites' do."""
    from mhc_train.config import OptimConfig
    from mhc_train.optim import build_optimizer

    model = _ds_model()
    opt = build_optimizer(model, OptimConfig(connection_lr_mult=0.5))
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    head = model.collapse_conn
    assert group_of[id(head.weight)] == "conn_decay"
    assert group_of[id(head.bias)] == group_of[id(head.scale)] == "conn_no_decay"
