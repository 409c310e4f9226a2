"""The decode path of the connection sites (mhc_train/infer/sites.py, sinkhorn_cpu.py): the same math as the training
sites, the C Sinkhorn loop equal to the reference and its fallback, and the op count that makes decode fast."""

from __future__ import annotations

import pytest
import torch

from mhc_train.infer import sinkhorn_cpu
from mhc_train.infer.generate import Decoder
from mhc_train.infer.sinkhorn_cpu import c_compiler, native_sinkhorn
from mhc_train.infer.sites import DecodeSite, HCDecodeSite, MHCDecodeSite, decode_site
from mhc_train.ops import sinkhorn_knopp_ref
from mhc_train.ops.reference import sinkhorn_forward
from tests.support.configs import ALL_ARMS, decode_model
from tests.support.numerics import assert_close

needs_cc = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here: decode runs the torch Sinkhorn loop")


def _logits(N, n, scale, seed=0):
    """[N, n, n] logits as decode has them: a strided view into [N, K] coefficient rows."""
    g = torch.Generator().manual_seed(seed)
    rows = scale * torch.randn(N, n * n + 2 * n, generator=g)
    return rows[:, 2 * n :].view(N, n, n)


@pytest.mark.parametrize("n, scale, iters", [(4, 1.0, 20), (4, 10.0, 20), (2, 3.0, 1), (8, 3.0, 7)])
def test_sinkhorn_loops_equal_the_reference(n, scale, iters):
    z = _logits(33, n, scale)
    ref = sinkhorn_knopp_ref(z, iters)
    assert_close(sinkhorn_forward(z.clone(), iters, inplace=True), ref, atol=0, what="in-place torch loop")
    assert not torch.equal(ref, sinkhorn_knopp_ref(z, iters + 1))  # iters is honoured (not converged yet)
    if c_compiler() is not None:  # a machine with a compiler must build the C loop
        native = native_sinkhorn()
        assert native is not None, "the C loop did not build (see the warning)"
        assert_close(native(z, iters), ref, atol=2e-6, what="C loop")


@needs_cc
def test_native_sinkhorn_refuses_what_it_was_not_written_for():
    with pytest.raises(ValueError, match="float32 CPU"):
        native_sinkhorn()(_logits(2, 4, 1.0).double(), 20)


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_c_compiler_decode_falls_back_to_torch_ops(cc, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native_sinkhorn.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Sinkhorn as torch ops.*the C loop is unavailable"):
            assert sinkhorn_cpu.native_sinkhorn() is None
        site = decode_site(decode_model("mhc").layers["0"].attn_conn)
        assert isinstance(site, MHCDecodeSite) and site.native_sinkhorn is None
    finally:
        native_sinkhorn.cache_clear()  # the next caller builds (or finds) the real one


@pytest.mark.parametrize("arm, native", [(arm, True) for arm in ALL_ARMS] + [("mhc", False)])
def test_decode_site_equals_the_training_site(arm, native):
    native = native and c_compiler() is not None  # without one, both cases test the torch loop
    model = decode_model(arm)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(model.cfg.dim, model.cfg.dim, generator=g) / model.cfg.dim**0.5
    sublayer = lambda h: torch.tanh(h @ w)  # noqa: E731
    x = torch.randn(3, 5, model.n_streams, model.cfg.dim, generator=g)  # [B, T, n, C]
    with torch.no_grad():
        for name, site in model.sites():
            fast = decode_site(site, native)
            want = {"residual": type(site), "hc": HCDecodeSite, "hc_static": HCDecodeSite}.get(arm, MHCDecodeSite)
            assert isinstance(fast, want), (name, type(fast))  # the fast path is the one under test
            if isinstance(fast, MHCDecodeSite) and not fast.identity_res:
                assert (fast.native_sinkhorn is not None) == native
            assert_close(fast(x, sublayer), site(x, sublayer), atol=2e-6, what=f"{arm} {name}")
            x = site(x, sublayer)


def _ops_per_step(model, native=True):
    """Top-level torch ops of one decode step (batch 1)."""
    dec = Decoder(model, native)
    cache = dec.new_cache(1, 8)
    dec.forward(torch.tensor([[1, 2, 3]]), cache)
    with torch.autograd.profiler.profile() as prof:
        dec.forward(torch.tensor([[4]]), cache)
    return sum(1 for e in prof.function_events if e.cpu_parent is None)


@needs_cc
def test_an_mhc_decode_step_costs_few_ops_per_site():
    """Decode is dispatch-bound: the op count is the cost. Per site over the residual's, the training sites spend ~130
    ops (mHC, 80 of them Sinkhorn) and ~40 (HC); the decode sites 24 (mHC with the C loop, 108 with torch's) and
    20 (HC)."""
    base = _ops_per_step(decode_model("residual"))
    sites = 2 * decode_model("residual").cfg.n_layer
    extra = {arm: (_ops_per_step(decode_model(arm)) - base) / sites for arm in ("hc", "mhc", "mhc_identity")}
    assert all(v <= 30 for v in extra.values()), extra
    assert (_ops_per_step(decode_model("mhc"), native=False) - base) / sites >= 80 + extra["mhc"]  # the loop, as ops
    assert isinstance(decode_site(decode_model("mhc").layers["0"].attn_conn), DecodeSite)


def test_a_decode_step_computes_the_new_token_only():
    """The stream state and the coefficients are per token: after the prefill every site sees [B, 1, n, C], whatever
    the prefix length (nothing is recomputed over the prefix)."""
    dec = Decoder(decode_model("mhc"))
    seen = []
    dec.sites = [tuple(_Recorder(s, seen) for s in pair) for pair in dec.sites]
    cache = dec.new_cache(2, 20)
    dec.forward(torch.randint(0, 256, (2, 7)), cache)
    assert {s[1] for s in seen} == {7}
    seen.clear()
    for _ in range(3):
        dec.forward(torch.randint(0, 256, (2, 1)), cache)
    assert len(seen) == 3 * len(dec.sites) * 2 and {s[:2] for s in seen} == {(2, 1)}


class _Recorder:
    def __init__(self, site, seen):
        self.site, self.seen = site, seen

    def __call__(self, x, sublayer):
        self.seen.append(tuple(x.shape))
        return self.site(x, sublayer)
