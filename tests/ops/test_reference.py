"""The connection math of `mhc_train.ops` against hand-made cases, the textbook formula and finite differences."""

import pytest
import torch

from mhc_train import ops
from tests.support.numerics import assert_close

SHAPES = [(3, 1, 5), (2, 2, 7), (4, 4, 13), (2, 8, 9)]  # (tokens, n, C): odd C, n in {1, 2, 4, 8}
IDS = [f"T{t}-n{n}-C{c}" for t, n, c in SHAPES]


def _inputs(tokens, n, C, dtype=torch.float64, scale=1.0):
    k = n * n + 2 * n
    x = torch.randn(tokens, n, C, dtype=dtype)
    phi = torch.randn(n * C, k, dtype=dtype) * scale
    alpha = torch.rand(3, dtype=dtype) + 0.1
    bias = torch.randn(k, dtype=dtype) * 0.5
    return x, phi, alpha, bias


def test_h_res_is_left_multiplied():
    """new stream i = sum_j H_res[i, j] x_j, on a hand-made non-symmetric matrix."""
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])  # n=3 streams, C=2
    h_res = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # stream 0 <- stream 1, ...
    y = torch.zeros(2)
    out = ops.mhc_post_res(x, y, torch.zeros(3), h_res)
    assert torch.equal(out, torch.tensor([[2.0, 20.0], [3.0, 30.0], [1.0, 10.0]]))
    # the write: stream i receives h_post[i] * y
    out = ops.mhc_post_res(torch.zeros(3, 2), torch.tensor([1.0, -1.0]), torch.tensor([1.0, 2.0, 3.0]), h_res)
    assert torch.equal(out, torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]))
    # the read
    assert torch.equal(ops.mhc_pre(x, torch.tensor([1.0, 0.0, 0.5])), torch.tensor([2.5, 25.0]))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sinkhorn_rows_exact_columns_within_tolerance(n):
    logits = torch.randn(64, n, n)  # moderate logits
    m = ops.sinkhorn_knopp(logits, iters=20)
    assert m.dtype == torch.float32 and (m >= 0).all()
    row_err = (m.sum(-1) - 1).abs().max().item()
    col_err = (m.sum(-2) - 1).abs().max().item()
    print(f"n={n}: row error {row_err:.2e}, column error {col_err:.2e}")
    assert row_err < 1e-6
    assert col_err < 1e-3


def test_sinkhorn_column_error_reported_for_peaked_logits():
    """20 iterations do not converge on peaked logits: all truncation error sits in the columns (spec section 3)."""
    m = ops.sinkhorn_knopp(torch.randn(256, 4, 4, dtype=torch.float64) * 10, iters=20)
    col_err = (m.sum(-2) - 1).abs().max().item()
    print(f"N(0, 100) logits, t_max=20: column error {col_err:.3f}")
    assert (m.sum(-1) - 1).abs().max().item() < 1e-12
    assert col_err > 1e-2  # not converged, and visible


def test_sinkhorn_more_iterations_converge():
    logits = torch.randn(32, 4, 4, dtype=torch.float64)
    errs = [(ops.sinkhorn_knopp(logits, t).sum(-2) - 1).abs().max().item() for t in (1, 5, 300)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8


def test_sinkhorn_shift_invariant():
    logits = torch.randn(16, 4, 4, dtype=torch.float64)
    shift = torch.randn(16, 1, 1, dtype=torch.float64) * 30
    assert_close(ops.sinkhorn_knopp(logits + shift), ops.sinkhorn_knopp(logits), atol=1e-12, what="shift")
    # row and column scalings of exp(logits) are invisible too
    r, c = torch.randn(16, 4, 1, dtype=torch.float64), torch.randn(16, 1, 4, dtype=torch.float64)
    assert_close(ops.sinkhorn_knopp(logits + r + c, 200), ops.sinkhorn_knopp(logits, 200), atol=1e-9, what="scaling")


def test_sinkhorn_gradcheck_random_upstream():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, 4, dtype=torch.float64)  # random, never all-ones (degenerate for a DS output)
    assert torch.autograd.gradcheck(lambda z: (ops.sinkhorn_knopp(z, 20) * upstream).sum(), (logits,))
    assert torch.autograd.gradcheck(lambda z: ops.sinkhorn_knopp(z, 7), (logits,))


def _textbook(x, gain, phi, alpha, bias, iters, eps):
    """Unfused: RMSNorm(vec(x)) with its gain, then the matmul, then gates, biases and the maps."""
    n = x.shape[-2]
    v = x.flatten(-2)
    normed = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain
    h = normed @ phi
    pre = torch.sigmoid(alpha[0] * h[..., :n] + bias[:n])
    post = 2 * torch.sigmoid(alpha[1] * h[..., n : 2 * n] + bias[n : 2 * n])
    res_logits = (alpha[2] * h[..., 2 * n :] + bias[2 * n :]).reshape(*h.shape[:-1], n, n)
    m = torch.exp(res_logits)
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return pre, post, m


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_coefficients_match_textbook(shape):
    x, phi, alpha, bias = _inputs(*shape, scale=0.3)
    gain = torch.rand(x.shape[-2] * x.shape[-1], dtype=torch.float64) + 0.5
    expected = _textbook(x, gain, phi, alpha, bias, 20, 1e-6)
    actual = ops.mhc_coefficients(x, gain[:, None] * phi, alpha, bias, iters=20, eps=1e-6)  # gain folded in phi
    for name, a, e in zip(("h_pre", "h_post", "h_res"), actual, expected):
        assert_close(a, e, atol=1e-12, what=name)


def test_coefficients_fp32_path_for_bf16_streams():
    x, phi, alpha, bias = _inputs(4, 4, 16, dtype=torch.float32, scale=0.1)
    pre, post, res = ops.mhc_coefficients(x.bfloat16(), phi, alpha, bias)
    assert pre.dtype == post.dtype == res.dtype == torch.float32
    ref = ops.mhc_coefficients(x.bfloat16().float(), phi, alpha, bias)
    for a, e in zip((pre, post, res), ref):
        assert_close(a, e, atol=1e-6, what="bf16 streams")
    assert ops.mhc_pre(x.bfloat16(), pre).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_functions_gradcheck(shape):
    x, phi, alpha, bias = (t.requires_grad_() for t in _inputs(*shape, scale=0.3))
    w_pre, w_post, w_res = (torch.randn(s, dtype=torch.float64) for s in (shape[:2], shape[:2], (*shape[:2], shape[1])))

    def coeffs(x, phi, alpha, bias):
        pre, post, res = ops.mhc_coefficients(x, phi, alpha, bias, iters=5)
        return (pre * w_pre).sum() + (post * w_post).sum() + (res * w_res).sum()

    assert torch.autograd.gradcheck(coeffs, (x, phi, alpha, bias))
    h_pre = torch.rand(shape[:2], dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(shape[:2], dtype=torch.float64, requires_grad=True)
    h_res = torch.rand((*shape[:2], shape[1]), dtype=torch.float64, requires_grad=True)
    y = torch.randn(shape[0], shape[2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.mhc_pre, (x, h_pre))
    assert torch.autograd.gradcheck(ops.mhc_post_res, (x, y, h_post, h_res))


def test_identity_h_res_variant():
    x, phi, alpha, bias = _inputs(3, 4, 5)
    pre, post, res = ops.mhc_coefficients(x, phi[:, :8], alpha[:2], bias[:8])
    assert res is None
    full = ops.mhc_coefficients(x, phi, alpha, bias)
    assert_close(pre, full[0], atol=1e-12) and assert_close(post, full[1], atol=1e-12)
    y = torch.randn(3, 5, dtype=torch.float64)
    assert_close(ops.mhc_post_res(x, y, post, None), ops.mhc_post_res(x, y, post, torch.eye(4).double()), atol=0)


def test_shape_errors_name_expected_and_actual():
    x, phi, alpha, bias = _inputs(2, 4, 5)
    with pytest.raises(ValueError, match=r"phi must be \[n\*C, n\*n\+2n\] = \[20, 24\]"):
        ops.mhc_coefficients(x, phi[:, :10], alpha, bias)
    with pytest.raises(ValueError, match="square"):
        ops.sinkhorn_knopp(torch.randn(2, 3, 4))


def test_backend_switch_is_explicit():
    assert ops.resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match="connection.backend"):
        ops.resolve_backend("cuda")
    assert ops.resolve_backend("triton") == "triton" and ops.resolve_backend("auto", "cuda") == "triton"
    assert ops.resolve_backend("torch", "cuda") == "torch"


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_sinkhorn_recompute_backward_matches_autograd_reference(n):
    """The hand-written backward (iterates recomputed, nothing stored per iteration) equals autograd through them."""
    from mhc_train.ops.sinkhorn import sinkhorn_knopp_torch

    z = (torch.randn(3, 5, n, n, dtype=torch.float64) * 2).requires_grad_()
    upstream = torch.randn(3, 5, n, n, dtype=torch.float64)
    fast, ref = sinkhorn_knopp_torch(z, 20), ops.sinkhorn_knopp_ref(z, 20)
    assert_close(fast, ref, atol=1e-13, what="forward")
    (g_fast,) = torch.autograd.grad((fast * upstream).sum(), z)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), z)
    assert_close(g_fast, g_ref, atol=1e-12, what="backward")
    assert torch.autograd.gradcheck(lambda t: sinkhorn_knopp_torch(t, 9), (z[0, :2].detach().requires_grad_(),))
    # float32 logits: float32 result, gradient back in the input dtype
    z32 = z.detach().float().requires_grad_()
    out = sinkhorn_knopp_torch(z32, 20)
    out.backward(upstream.float())
    assert out.dtype == z32.grad.dtype == torch.float32


def test_implicit_sinkhorn_backward_equals_unrolled_at_convergence_and_differs_before():
    from mhc_train.ops.sinkhorn import sinkhorn_knopp_implicit

    z = torch.randn(32, 4, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(32, 4, 4, dtype=torch.float64)
    rel = {}
    for scale, iters in [(1.0, 300), (3.0, 20)]:
        zs = (z * scale).detach().requires_grad_()
        (gi,) = torch.autograd.grad((sinkhorn_knopp_implicit(zs, iters) * up).sum(), zs)
        (gu,) = torch.autograd.grad((ops.sinkhorn_knopp(zs, iters) * up).sum(), zs)
        rel[(scale, iters)] = ((gi - gu).norm() / gu.norm()).item()
    print("implicit vs unrolled relative gradient difference:", rel)
    assert rel[(1.0, 300)] < 1e-10  # the same gradient at the fixed point
    assert rel[(3.0, 20)] > 1e-4  # not converged: the implicit gradient is of the fixed point, not of 20 steps
    zc = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn_knopp_implicit(t, 500), (zc,), atol=1e-6)


def test_mhc_coefficients_with_implicit_backward_trains():
    x = torch.randn(4, 4, 8, requires_grad=True)
    phi = (torch.randn(32, 24) * 0.1).requires_grad_()
    out = ops.mhc_coefficients(x, phi, torch.full((3,), 0.5), torch.zeros(24), sinkhorn_backward="implicit")
    sum(o.sum() * w for o, w in zip(out, (1.0, 2.0, 3.0))).backward()
    assert torch.isfinite(phi.grad).all() and phi.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sinkhorn_backward"):
        ops.mhc_coefficients(x, phi, torch.ones(3), torch.zeros(24), sinkhorn_backward="neumann")
