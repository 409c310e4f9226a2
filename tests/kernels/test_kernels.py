"""Every Triton kernel against its PyTorch reference (fp64), forward and backward, random upstream gradients.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py before triton is
imported), so shapes and grids are small; on a GPU the same tests compile the kernels for real.
"""

import warnings

import pytest
import torch

import mhc_kernels as K
from mhc_kernels.utils import force_candidate
from mhc_train import ops
from mhc_train.ops.reference import (
    hc_gates_ref,
    hc_projection_ref,
    mhc_post_res_ref,
    mhc_pre_ref,
    mhc_projection_ref,
    sinkhorn_knopp_ref,
)
from tests.support.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(5, 1, 13), (7, 2, 37), (9, 4, 67), (3, 8, 33), (2, 16, 19)]  # (tokens, n, C): n in 1..16, odd C
IDS = [f"T{t}-n{n}-C{c}" for t, n, c in SHAPES]
DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 2e-2)}  # stream dtype, relative tolerance


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE).requires_grad_()


def _check(name, got, ref, rtol):
    scale = max(ref.detach().abs().max().item(), 1e-6)
    assert_close(got.double().cpu(), ref.detach().double().cpu(), atol=rtol * scale, what=name)


def _compare(kernel_fn, ref_fn, inputs, rtol, names):
    """Forward and every gradient of kernel_fn vs ref_fn run in fp64 on the same (rounded) inputs."""
    out = kernel_fn(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = ref_fn(*ref_inputs)
    _check("forward", out, ref, rtol)
    g = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    live = [(n, a, b) for n, a, b in zip(names, inputs, ref_inputs) if a is not None]
    got = torch.autograd.grad(out, [a for _, a, _ in live], g.to(out.dtype))
    want = torch.autograd.grad(ref, [b for _, _, b in live], g)
    for (name, _, _), a, b in zip(live, got, want):
        _check(f"grad {name}", a, b, rtol)


CANDIDATES = pytest.mark.parametrize("candidate", [0, 1], ids=["config0", "config1"])  # every autotune candidate


@CANDIDATES
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_pre_matches_reference(shape, dtype, candidate):
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    with force_candidate(candidate):
        _compare(
            K.mhc_pre,
            mhc_pre_ref,
            [_rand(T, n, C, dtype=dt), _rand(T, n).detach().sigmoid().requires_grad_()],
            rtol,
            ["x", "h_pre"],
        )


@CANDIDATES
@pytest.mark.parametrize("identity", [False, True], ids=["sinkhorn", "identity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_post_res_matches_reference(shape, dtype, identity, candidate):
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    h_res = None if identity else _rand(T, n, n).detach().softmax(-1).requires_grad_()
    with force_candidate(candidate):
        _compare(
            K.mhc_post_res,
            mhc_post_res_ref,
            [
                _rand(T, n, C, dtype=dt),
                _rand(T, C, dtype=dt),
                _rand(T, n).detach().sigmoid().mul(2).requires_grad_(),
                h_res,
            ],
            rtol,
            ["x", "y", "h_post", "h_res"],
        )


@pytest.mark.parametrize("n,iters", [(1, 20), (2, 20), (4, 20), (8, 20), (16, 20), (4, 1), (3, 7)])
def test_sinkhorn_matches_reference_through_all_iterations(n, iters):
    """The O(t_max) backward (sums kept per step, steps undone in reverse) against autograd through every iteration."""
    logits = _rand(6, n, n, scale=2.0)
    _compare(lambda z: K.sinkhorn_knopp(z, iters), lambda z: sinkhorn_knopp_ref(z, iters), [logits], 1e-5, ["logits"])


TF32_ULP = 2.0**-10  # relative error of one product of two TF32-rounded operands (10 mantissa bits each)
# The interpreter computes tl.dot exactly in fp32: there the bound is fp32's, so an algebra slip cannot hide in it.
PRODUCT_ULP = TF32_ULP if DEVICE == "cuda" else 2.0**-20


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_projection_matches_reference_within_the_tf32_bound(shape, dtype):
    """Kernel 1 runs its matmuls on tensor cores (TF32 operands, fp32 accumulation). Each output and gradient must be
    within 2 * 2^-10 of the sum of |products| (the TF32 rounding bound) plus fp32 accumulation, against fp64, on a
    GPU; under the interpreter (exact fp32 dots) within 2 * 2^-20 of it."""
    T, n, C = shape
    dt = DTYPES[dtype][0]
    x, phi = _rand(T + 11, n, C, dtype=dt), _rand(n * C, n * n + 2 * n, scale=0.1)
    h = K.mhc_projection(x, phi, 1e-6)
    xd, phid = x.detach().double().requires_grad_(), phi.detach().double().requires_grad_()
    ref = mhc_projection_ref(xd, phid)
    gh = torch.randn(h.shape, dtype=torch.float64, device=DEVICE)
    dx, dphi = torch.autograd.grad(h, [x, phi], gh.float())
    dx_ref, dphi_ref = torch.autograd.grad(ref, [xd, phid], gh)
    v, p = xd.detach().reshape(-1, n * C), phid.detach()
    r = (v.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    dproj = gh / r
    fp32 = 2e-6  # fp32 accumulation and the norm's own rounding, relative to each output's scale
    bounds = {
        "forward": (h, ref, (v.abs() @ p.abs()) / r),
        # dv = dproj @ phi^T (TF32) + a norm term computed in fp32; dphi = v^T @ dproj (TF32)
        "grad x": (dx.reshape(-1, n * C), dx_ref.reshape(-1, n * C), dproj.abs() @ p.abs().T),
        "grad phi": (dphi, dphi_ref, v.abs().T @ dproj.abs()),
    }
    for name, (got, want, mag) in bounds.items():
        err = (got.detach().double() - want.detach().double()).abs()
        allowed = 2 * PRODUCT_ULP * mag + fp32 * want.detach().abs().max()
        if dt != torch.float32:
            allowed = allowed + 2e-2 * want.detach().abs().max() * (name == "grad x")  # dx is stored in bf16
        worst = (err / allowed).max().item()
        assert worst <= 1.0, f"{name}: error {err.max().item():.3e} exceeds the TF32 bound ({worst:.2f}x)"


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_hc_projection_matches_reference(shape, dtype):
    """HC's dynamic projection through the kernel (per-stream norm, block-diagonal weight): forward and the x and
    weight gradients against fp64 (the weight's gradient sums the n diagonal blocks of the kernel's dphi)."""
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    x, w = _rand(T + 11, n, C, dtype=dt), _rand(C, n + 2, scale=0.1)
    _compare(
        lambda x, w: ops.hc_projection(x, w, 1e-6, backend="triton"),
        lambda x, w: hc_projection_ref(x, w, 1e-6),
        [x, w],
        max(rtol, 1e-4),
        ["x", "weight"],
    )


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16])
def test_hc_gates_match_reference(n):
    """HC's coefficient tail in one kernel: every output and the gradients of h, the static part and the scales (the
    latter two reduce over tokens in per-program partials), against fp64; h spans tanh's small-argument series and
    its saturated range."""
    T = 37
    h = _rand(T, n, n + 2, scale=1.5)
    with torch.no_grad():
        h[0] = torch.linspace(-1e-3, 1e-3, n * (n + 2)).view(n, n + 2)  # the series branch, and 0 exactly
    static, scale = _rand(n, n + 2), _rand(n + 2, scale=0.1)
    inputs = [h, static, scale]
    got = K.hc_gates(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = hc_gates_ref(*ref_inputs)
    for name, a, b in zip(("h_pre", "h_post", "h_res"), got, want):
        _check(name, a, b, 1e-6)
    ups = [torch.randn(w.shape, dtype=torch.float64, device=DEVICE) for w in want]
    g_got = torch.autograd.grad(got, inputs, [u.float() for u in ups])
    g_want = torch.autograd.grad(want, ref_inputs, ups)
    for name, a, b in zip(("h", "static", "scale"), g_got, g_want):
        _check(f"grad {name}", a, b, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(9, 4, 67), (2, 16, 19), (5, 3, 33)], ids=["T9-n4-C67", "T2-n16-C19", "T5-n3-C33"])
def test_linked_hc_site_matches_the_torch_site(shape, dtype):
    """A dynamic HC site on the kernels (per-stream projection, pre and post_res linked, one dx) against the same site
    on the torch backend: output and every gradient (x and all six parameters), random upstream."""
    from mhc_train.config import ConnectionConfig
    from mhc_train.model.connections import HCSite

    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    sites = {}
    for backend in ("triton", "torch"):
        site = HCSite(C, n, 1, ConnectionConfig(type="hc", n_streams=n, backend=backend)).to(DEVICE)
        torch.manual_seed(0)
        with torch.no_grad():  # a trained-looking site: every coefficient depends on x
            for p in site.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        sites[backend] = site
    x = _rand(2, T, n, C, dtype=dt)
    lin = torch.randn(C, C, device=DEVICE, dtype=torch.float64) / C**0.5
    outs, grads = {}, {}
    for backend, site in sites.items():
        xb = x.detach().clone().requires_grad_()
        out = site(xb, lambda f: (f.double() @ lin).to(f.dtype))
        up = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE).to(out.dtype)
        params = [xb, *site.parameters()]
        outs[backend], grads[backend] = out, torch.autograd.grad(out, params, up)
    _check("forward", outs["triton"], outs["torch"], rtol)
    names = ["x", *(name for name, _ in sites["torch"].named_parameters())]
    for name, a, b in zip(names, grads["triton"], grads["torch"]):
        _check(f"grad {name}", a, b, max(rtol, 1e-4))


def test_a_link_refuses_coefficients_that_cannot_order_its_backward():
    """The hand-over relies on the projection's backward running after pre's and post_res's, which holds when their
    coefficients come from x; a detached coefficient is refused at forward, a link serves one site, and a term
    never handed over in this backward call is no term."""
    x, phi = _rand(5, 4, 24), _rand(96, 24, scale=0.1)
    link = K.SiteLink()
    h = K.mhc_projection(x, phi, 1e-6, link=link)
    h_pre = h[:, :4].sigmoid()
    with pytest.raises(ValueError, match="h_pre do"):
        K.mhc_pre(x, h_pre.detach(), link=link)
    K.mhc_pre(x, h_pre, link=link)
    with pytest.raises(RuntimeError, match="joined twice"):
        K.mhc_pre(x, h_pre, link=link)
    assert link.take("post_res") == (None, None)


def test_phi_gradient_is_bit_reproducible():
    """The dphi reduction is two-stage (per-split partials summed in a fixed order): no atomics, same bits every run."""
    x, phi = _rand(40, 4, 24), _rand(96, 24, scale=0.1)
    g = torch.randn(40, 24, device=DEVICE)
    grads = [torch.autograd.grad(K.mhc_projection(x, phi, 1e-6), phi, g)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_unsupported_inputs_raise_with_the_reason():
    x = torch.randn(4, 4, 10, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        K.mhc_pre(x, torch.rand(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        K.mhc_pre(torch.randn(4, 10, 4, device=DEVICE).transpose(1, 2), torch.rand(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="n = 32 streams is above"):
        K.mhc_pre(torch.randn(2, 32, 8, device=DEVICE), torch.rand(2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="n = 17 is above"):
        K.sinkhorn_knopp(torch.randn(2, 17, 17, device=DEVICE))
    # above the kernels' limit the ops layer takes the torch path, with one notice per op and n (never OutOfResources)
    ops.backends._noticed.clear()
    x17, h17 = torch.randn(2, 17, 8, device=DEVICE), torch.rand(2, 17, device=DEVICE)
    with pytest.warns(UserWarning, match="n = 17 streams is above the Triton kernels' limit of 16"):
        out = ops.mhc_pre(x17, h17, backend="triton")
    assert_close(out, mhc_pre_ref(x17, h17), atol=1e-6, what="n = 17 torch path")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        ops.mhc_pre(x17, h17, backend="triton")
    # the ops layer makes inputs contiguous itself (a correct fallback), and still refuses what no kernel handles
    xt = torch.randn(3, 8, 4, device=DEVICE).transpose(1, 2)
    h = torch.rand(3, 4, device=DEVICE)
    assert_close(ops.mhc_pre(xt, h, backend="triton"), mhc_pre_ref(xt, h), atol=1e-6, what="non-contiguous x")
    with pytest.raises(ValueError, match="float64"):
        ops.mhc_post_res(x, torch.randn(4, 10, dtype=torch.float64), torch.rand(4, 4), None, backend="triton")


@pytest.mark.slow  # trains a model under the Triton interpreter: 15-25 s per case on 2 cores
@pytest.mark.parametrize("arm", ["hc", "mhc", "mhc_identity"])
def test_model_trained_with_triton_matches_torch_loss_for_loss(arm):
    from mhc_train.model import build_model
    from tests.support.configs import conn_cfg, tiny_model_cfg
    from tools.measure import next_token_loss

    tokens = torch.randint(0, 256, (4, 25), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    losses = {}
    for backend in ("torch", "triton"):
        model = build_model(tiny_model_cfg(), conn_cfg(arm, backend=backend, t_max=8), seed=0, device=DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(3):
            loss = next_token_loss(model, tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    print(arm, losses)
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-4, abs=1e-5)


@pytest.mark.slow  # trains a model under the Triton interpreter: 15-25 s per case on 2 cores
@pytest.mark.parametrize("arm", ["hc", "mhc"])
def test_model_trained_with_bf16_streams_triton_matches_torch(arm):
    """bf16 stream storage (model.stream_dtype, the paper's setting) under bf16 autocast: the kernels keep the
    streams bf16 and the stream math fp32, like the torch backend, so the two train alike to bf16 rounding."""
    import dataclasses

    from mhc_train.model import build_model
    from tests.support.configs import conn_cfg, tiny_model_cfg
    from tools.measure import next_token_loss

    tokens = torch.randint(0, 256, (4, 25), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    model_cfg = dataclasses.replace(tiny_model_cfg(), stream_dtype="bf16")
    losses = {}
    for backend in ("torch", "triton"):
        model = build_model(model_cfg, conn_cfg(arm, backend=backend, t_max=8), seed=0, device=DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[backend] = []
        for _ in range(3):
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = next_token_loss(model, tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[backend].append(loss.item())
    assert losses["torch"] == pytest.approx(losses["triton"], rel=2e-2), losses
    assert losses["triton"][-1] < losses["triton"][0], losses  # it trains


@pytest.mark.parametrize("identity", [False, True], ids=["sinkhorn", "identity"])
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_gates_sinkhorn_matches_reference(n, identity):
    """Kernel 2: gates, biases, sigmoid, 2*sigmoid and Sinkhorn fused; every output and gradient vs fp64 autograd."""
    k = 2 * n if identity else n * n + 2 * n
    h, alpha, bias = _rand(37, k, scale=2.0), _rand(2 if identity else 3).detach().abs().requires_grad_(), _rand(k)

    def ref(h, alpha, bias):  # the reference's tail: mhc_coefficients_ref after the projection
        pre = torch.sigmoid(alpha[0] * h[:, :n] + bias[:n])
        post = 2 * torch.sigmoid(alpha[1] * h[:, n : 2 * n] + bias[n : 2 * n])
        if identity:
            return pre, post, None
        return pre, post, sinkhorn_knopp_ref((alpha[2] * h[:, 2 * n :] + bias[2 * n :]).unflatten(-1, (n, n)), 20)

    got = K.mhc_gates_sinkhorn(h, alpha, bias, n, 20)
    ins = [t.detach().double().requires_grad_() for t in (h, alpha, bias)]
    want = ref(*ins)
    ups = [torch.randn(w.shape, dtype=torch.float64, device=DEVICE) for w in want if w is not None]
    for name, a, b in zip(("h_pre", "h_post", "h_res"), got, want):
        if b is not None:
            _check(name, a, b, 1e-5)
    g_got = torch.autograd.grad([a for a in got if a is not None], [h, alpha, bias], [u.float() for u in ups])
    g_want = torch.autograd.grad([b for b in want if b is not None], ins, ups)
    for name, a, b in zip(("h", "alpha", "bias"), g_got, g_want):
        _check(f"grad {name}", a, b, 1e-5)


@CANDIDATES
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(9, 4, 67), (2, 16, 19)], ids=["T9-n4-C67", "T2-n16-C19"])
def test_chained_site_writes_one_dx_that_matches_the_reference(shape, dtype, candidate):
    """A linked site (what a model site does): pre and post_res hand their x-gradient terms to the projection, whose
    backward kernel writes x's one gradient, the sum of the three ops' contributions. Checked against fp64 autograd
    through the unlinked reference site, random upstream gradients."""
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    x, phi = _rand(T, n, C, dtype=dt), _rand(n * C, n * n + 2 * n, scale=0.1)
    h_pre, h_post = _rand(T, n).detach().sigmoid().requires_grad_(), _rand(T, n).detach().sigmoid().requires_grad_()
    h_res, y = _rand(T, n, n).detach().softmax(-1).requires_grad_(), _rand(T, C, dtype=dt)

    def site(x, phi, h_pre, h_post, h_res, y, chained):
        if chained:
            link = K.SiteLink()
            h = K.mhc_projection(x, phi, 1e-6, link=link)
            f_in = K.mhc_pre(x, h_pre, link=link)
            return h, f_in, K.mhc_post_res(x, y, h_post, h_res, link=link)
        return mhc_projection_ref(x, phi), mhc_pre_ref(x, h_pre), mhc_post_res_ref(x, y, h_post, h_res)

    inputs = [x, phi, h_pre, h_post, h_res, y]
    with force_candidate(candidate):
        got = site(*inputs, chained=True)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = site(*ref_inputs, chained=False)
    ups = [torch.randn(w.shape, dtype=torch.float64, device=DEVICE) for w in want]
    with force_candidate(candidate):
        g_got = torch.autograd.grad(got, inputs, [u.to(o.dtype) for u, o in zip(ups, got)])
    g_want = torch.autograd.grad(want, ref_inputs, ups)
    tol = {"x": 2e-3 if dt == torch.float32 else rtol}  # x's gradient sums three terms of different scales
    for name, a, b in zip(("x", "phi", "h_pre", "h_post", "h_res", "y"), g_got, g_want):
        _check(f"grad {name}", a, b, tol.get(name, rtol if dt != torch.float32 else 1e-4))


def test_post_res_takes_a_bf16_sublayer_output_onto_fp32_streams_without_a_copy():
    """F's output may be bf16 (autocast) while the streams are fp32: the kernel widens y itself; dy comes back bf16."""
    T, n, C = 5, 4, 37
    x, y = _rand(T, n, C), _rand(T, C, dtype=torch.bfloat16)
    h_post, h_res = _rand(T, n).detach().sigmoid().requires_grad_(), _rand(T, n, n).detach().softmax(-1)
    _compare(
        K.mhc_post_res, mhc_post_res_ref, [x, y, h_post, h_res.requires_grad_()], 2e-2, ["x", "y", "h_post", "h_res"]
    )
    out = K.mhc_post_res(x, y, h_post, h_res)
    assert out.dtype == torch.float32
    assert torch.autograd.grad(out, y, torch.randn_like(out))[0].dtype == torch.bfloat16


def test_autotune_keeps_the_fastest_candidate_once_per_shape(monkeypatch):
    """launch_tuned's choice (the GPU path, driven here with a fake timer): every candidate is timed once per key, the
    fastest is kept and reused, and each run computes the same output."""
    from mhc_kernels import utils

    timed = []

    def fake_bench(fn):
        fn()
        timed.append(len(timed))
        return [2.0, 1.0][len(timed) - 1] if len(timed) <= 2 else 9.0  # candidate 1 is faster

    monkeypatch.setattr(utils, "_tunes", lambda args: True)
    monkeypatch.setattr(utils, "_bench", fake_bench)
    monkeypatch.setattr(utils, "_tuned", {})
    x, h = _rand(9, 4, 67).detach(), _rand(9, 4).detach().sigmoid()
    want = mhc_pre_ref(x.double(), h.double())
    for _ in range(3):
        with utils.capture() as launches:
            out = K.mhc_pre(x, h)
        _check("forward", out, want, 2e-5)
    assert len(timed) == 2  # two candidates, timed on the first call only
    assert list(utils._tuned.values()) == [1]
    assert launches[-1].options["num_warps"] == 8  # the third call ran candidate 1 (8 warps) without timing


@pytest.mark.parametrize("arm", ["mhc", "hc"])
def test_linked_site_under_a_split_backward_matches_one_backward(arm):
    """ZBV and DualPipeV split each backward in two: input gradients first, then weight gradients, which re-runs the
    nodes next to the weights (the projection among them) but not pre or post_res. A linked site must give the same
    gradients that way (torch.distributed.pipelining's own two functions) as in one backward."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from mhc_train.config import ConnectionConfig
    from mhc_train.model.connections import HCSite, MHCSite

    T, n, C = 6, 4, 33
    site = (MHCSite if arm == "mhc" else HCSite)(C, n, 1, ConnectionConfig(type=arm, n_streams=n, backend="triton"))
    site = site.to(DEVICE)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in site.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    lin = torch.randn(C, C, device=DEVICE) / C**0.5
    x0 = torch.randn(2, T, n, C, device=DEVICE)
    up = torch.randn(2, T, n, C, device=DEVICE)

    def run():
        x = x0.clone().requires_grad_()
        return x, site(x, lambda f: f @ lin).clone()  # not a view: the input pass detaches its outputs in place

    x, out = run()
    want = torch.autograd.grad(out, [x, *site.parameters()], up)
    x, out = run()
    (dx,), groups = stage_backward_input([out], [up], [x], site.parameters())
    for p in site.parameters():
        p.grad = None
    stage_backward_weight(site.parameters(), groups)
    got = [dx, *(p.grad for p in site.parameters())]
    names = ["x", *(name for name, _ in site.named_parameters())]
    for name, a, b in zip(names, got, want):
        assert a is not None, name
        _check(f"grad {name}", a, b, 1e-5)
