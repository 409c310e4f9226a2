"""The connection's site step (mhc_train/ops/step.py): the whole site on a backend resolved once per model and device."""

from __future__ import annotations

import pytest
import torch

from mhc_train import ops
from mhc_train.model.connections import build_connection
from mhc_train.model.transformer import build_model
from mhc_train.ops import backends
from mhc_train.ops.reference import mhc_coefficients_ref, mhc_post_res_ref, mhc_pre_ref
from tests.support.configs import conn_cfg, tiny_model_cfg
from tests.support.numerics import assert_close

B, T, N, C = 2, 5, 4, 12


def _mhc_site(backend: str):
    site = build_connection(conn_cfg("mhc", backend=backend, t_max=6)).site(C, 1)
    site.init_weights(torch.Generator().manual_seed(0))
    return site


def _reference_site(site, x, sublayer):
    """The site spelled out with the plain references: what the step must compute."""
    h_pre, h_post, h_res = mhc_coefficients_ref(x, site.phi, site.alpha, site.bias, site.cfg.t_max, site.cfg.eps)
    return mhc_post_res_ref(x, sublayer(mhc_pre_ref(x, h_pre)), h_post, h_res)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_site_step_equals_the_reference_site(backend):
    """Output and every gradient (x, phi, alpha, bias) of the step against the reference site, random upstream."""
    g = torch.Generator().manual_seed(1)
    site = _mhc_site(backend)
    w = torch.randn(C, C, generator=g) / C**0.5
    sublayer = lambda h: torch.tanh(h @ w)  # noqa: E731
    x = torch.randn(B, T, N, C, generator=g, requires_grad=True)
    up = torch.randn(B, T, N, C, generator=g)
    params = [x, site.phi, site.alpha, site.bias]
    got = site(x, sublayer)
    want = _reference_site(site, x, sublayer)
    assert_close(got, want, atol=1e-5, what=f"{backend} output")
    for name, a, b in zip(("x", "phi", "alpha", "bias"), torch.autograd.grad(got, params, up),
                          torch.autograd.grad(want, params, up)):  # fmt: skip
        assert_close(a, b, atol=1e-5, what=f"{backend} d{name}")


def test_the_backend_is_resolved_once_per_model_and_device(monkeypatch):
    """Every site of a model shares one step; the name is resolved on the first call for a device, never per op."""
    calls = []
    real = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", lambda *a: calls.append(a) or real(*a))
    model = build_model(tiny_model_cfg(), conn_cfg("mhc", backend="auto", t_max=4), seed=0)
    steps = {id(site.step) for _, site in model.sites()}
    assert len(steps) == 1, "the connection gives every site the same step"
    tokens = torch.randint(0, 256, (2, 9))
    for _ in range(3):
        model(tokens).sum().backward()
    assert calls == [("auto", torch.device("cpu"))], calls


def test_a_model_built_on_meta_resolves_where_it_is_materialised():
    """Pipeline stages and FSDP / DeepSpeed engines build on meta: nothing is resolved until the first real call."""
    model = build_model(tiny_model_cfg(), conn_cfg("mhc", backend="auto", t_max=4), seed=0, device="meta")
    step = model.layers["0"].attn_conn.step
    assert step._resolved == {}
    model.to_empty(device="cpu")
    model.init_weights(0)
    model(torch.randint(0, 256, (1, 5)))
    assert list(step._resolved) == [torch.device("cpu")] and step._resolved[torch.device("cpu")].name == "torch"


def test_state_passes_through_and_the_halves_compose():
    """`state` comes back as it went in (room for an arm that hands work to the next site); read + write = the step."""
    site = _mhc_site("torch")
    x = torch.randn(B, T, N, C)
    marker = object()
    out, state = site.step(site._coefficients, x, torch.sin, state=marker)
    assert state is marker
    f_in, read = site.read(x)
    assert torch.equal(site.write(x, torch.sin(f_in), read), out)


def test_the_runner_runs_post_res():
    """DualPipeV's hook: the step routes the post_res merge through the site's runner."""
    site = _mhc_site("torch")
    seen = []
    site.run_post_res_through(lambda fn, *a: seen.append(fn) or fn(*a))
    x = torch.randn(B, T, N, C)
    out = site(x, torch.sin)
    assert len(seen) == 1 and torch.equal(out, _mhc_site("torch")(x, torch.sin))


def test_above_sixteen_streams_triton_runs_the_torch_ops_with_a_notice():
    """The n > 16 fallback belongs to the backend: the site runs the torch ops, with no link, and says so once."""
    n = 17
    cfg = conn_cfg("mhc", backend="triton", n_streams=n, t_max=3)
    site = build_connection(cfg).site(4, 0)
    site.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, n, 4, requires_grad=True)
    backends._noticed.clear()
    with pytest.warns(UserWarning, match="above the Triton kernels' limit"):
        got = site(x, torch.tanh)
    torch_site = build_connection(ops_cfg := conn_cfg("mhc", n_streams=n, t_max=3)).site(4, 0)
    torch_site.load_state_dict(site.state_dict())
    assert ops_cfg.backend == "torch"
    assert torch.equal(got, torch_site(x, torch.tanh))
    kernels = site.step.kernels(x)
    kernels.mhc_coefficients(x, site.phi, site.alpha, site.bias, 3)
    assert kernels.link is None


def test_setting_a_site_backend_gives_it_its_own_step():
    site = _mhc_site("torch")
    shared = site.step
    site.backend = "triton"
    assert site.backend == "triton" and site.step is not shared and shared.name == "torch"
    assert isinstance(ops.SiteStep("triton").backend(torch.device("cpu")), ops.TritonBackend)
