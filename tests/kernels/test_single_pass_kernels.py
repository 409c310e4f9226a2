"""The single-pass arm's fused kernels (mhc_kernels/single_pass.py, ops/single_pass.py) against their torch reference
(fp64), forward and every gradient, random upstream gradients; n = 2, 4, 8 (16 with MHC_TRAIN_MATRIX_FULL=1), fp32
and bf16 streams. Interpreter-sized shapes (TRITON_INTERPRET=1 on CPU, tests/conftest.py)."""

import os

import pytest
import torch

from mhc_train.ops.single_pass import (
    single_pass_read,
    single_pass_read_ref,
    single_pass_write,
    single_pass_write_ref,
)
from tests.support.numerics import assert_close

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("MHC_TRAIN_MATRIX_FULL", "") not in ("", "0")
SHAPES = [(9, 2, 37), (5, 4, 24), (3, 8, 19)] + ([(4, 16, 16)] if FULL else [])  # (tokens, n, C); n = 8: 3 K tiles
DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 2e-2)}  # state dtype, relative tolerance


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(DEVICE).requires_grad_()


def _state(T, n, C, dtype):
    """A packed state: n streams and the carried mix (a softmax-like read, zeros after channel n)."""
    x = torch.randn(T, n, C, dtype=torch.float64)
    mix = torch.nn.functional.pad(torch.rand(T, n, dtype=torch.float64) + 0.1, (0, C - n)).unsqueeze(1)
    return torch.cat([x, mix], 1).to(dtype).to(DEVICE).requires_grad_()


def _compare(kernel_fn, ref_fn, inputs, rtol):
    """Every output and every input gradient of kernel_fn vs ref_fn in fp64 on the same (rounded) inputs."""
    outs = kernel_fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    refs = ref_fn(*ref_inputs)
    refs = refs if isinstance(refs, tuple) else (refs,)
    for i, (a, b) in enumerate(zip(outs, refs)):
        assert_close(a, b, atol=rtol * b.abs().max().item(), what=f"output {i}")
    gs = [torch.randn(o.shape, dtype=torch.float64, device=DEVICE) for o in outs]
    got = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(gs, outs)])
    want = torch.autograd.grad(refs, ref_inputs, gs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=rtol * b.abs().max().item(), what=f"grad of input {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-n{n}-C{c}" for t, n, c in SHAPES])
def test_single_pass_read_matches_reference(shape, dtype):
    """F_in = m . x with the carried mix and the projection h, from one pass over the packed state."""
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    state, phi = _state(T, n, C, dt), _rand(n * C, n * n + 2 * n, scale=0.3)
    _compare(
        lambda s, p: single_pass_read(s, p, 1e-6)[:2], lambda s, p: single_pass_read_ref(s, p, 1e-6), [state, phi], rtol
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-n{n}-C{c}" for t, n, c in SHAPES])
def test_single_pass_write_matches_reference(shape, dtype):
    """x' = H_res x + h_post (x) y on rows 0..n-1, the next mix zero-padded on row n, in one pass (unlinked: the
    backward writes its own gradient of the state)."""
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    inputs = [_state(T, n, C, dt), _rand(T, C, dtype=dt), _rand(T, n), _rand(T, n, n), _rand(T, n)]
    _compare(single_pass_write, single_pass_write_ref, inputs, rtol)


def _site(read, write, state, phi, w):
    """A whole single-pass site: read (F_in, h), coefficients from h (smooth stand-ins), F = tanh(F_in @ w), write."""
    f_in, h, *link = read(state, phi, 1e-6)
    n = state.shape[-2] - 1
    h_pre, h_post = torch.sigmoid(h[..., :n]), 2 * torch.sigmoid(h[..., n : 2 * n])
    h_res = torch.softmax(h[..., 2 * n :].unflatten(-1, (n, n)), -1)
    y = torch.tanh(f_in @ w.to(f_in.dtype))
    return write(state, y, h_post, h_res, h_pre, *link)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-n{n}-C{c}" for t, n, c in SHAPES])
def test_linked_single_pass_site_writes_one_gradient_that_matches_the_reference(shape, dtype):
    """The write's backward hands (g, H_res) to the read's, which writes the state's one gradient: values and the
    gradients of the state, phi and F's weight against the reference site."""
    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    state, phi, w = _state(T, n, C, dt), _rand(n * C, n * n + 2 * n, scale=0.3), _rand(C, C, scale=C**-0.5)

    def ref_read(s, p, eps):
        return single_pass_read_ref(s, p, eps)

    _compare(
        lambda s, p, w: _site(single_pass_read, single_pass_write, s, p, w),
        lambda s, p, w: _site(ref_read, single_pass_write_ref, s, p, w),
        [state, phi, w],
        rtol,
    )


def test_the_audit_counts_one_stream_pass_per_site_forward_and_the_issue_ratios():
    """The traffic audit (meta tensors, nothing runs) of a site inside the model: forward, one kernel touches the
    streams (its write fused with the next site's read; its own read came from the previous site's); backward, only
    the read's kernel writes a state-sized tensor (the write's backward is linked to it), no torch op reads or writes
    one. At n = 4, C = 4096: forward reads within issue 27's 1.1x of (n + 1)C, backward within 1.25x of its minimum
    (the forward writes' 1.25x: the mix row's padding, docs/mhc.md section 10)."""
    from scripts.bench_kernels import traffic_audit

    n, C = 2, 64
    audit = traffic_audit("mhc_single_pass", n=n, C=C, tokens=4096)
    stream = n * C * 4  # fp32 streams, bytes per token
    fwd, bwd = audit["forward"]["kernels"], audit["backward"]["kernels"]
    assert [r["kernel"] for r in fwd if r["read_B_per_token"] >= stream] == ["_sp_write_read_fwd_kernel"]
    assert [r["kernel"] for r in bwd if r["written_B_per_token"] >= stream] == ["_sp_read_bwd_kernel"]
    big_torch = [r for r in fwd + bwd if r["kernel"].startswith("aten.") and r["read_B_per_token"] >= stream / 2]
    assert big_torch == [], big_torch
    fused = fwd[-1]  # the stream pass: x_l and y read; x_{l+1} (packed) and F_{l+1}'s input written
    assert fused["kernel"] == "_sp_write_read_fwd_kernel"
    assert fused["read_B_per_token"] < (n + 1) * C * 4 * 1.1 and fused["written_B_per_token"] < (n + 2) * C * 4 * 1.1
    issue = traffic_audit("mhc_single_pass", n=4, C=4096, tokens=4096)  # the issue's shape: its targets
    assert issue["forward"]["read_to_minimum"] <= 1.1 and issue["backward"]["ratio_to_minimum"] <= 1.25


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-n{n}-C{c}" for t, n, c in SHAPES])
def test_fused_boundary_equals_the_unfused_write_then_read_bit_for_bit(shape, dtype):
    """Site l's write fused with site l+1's read (single_pass_fused.py): the next state, F_in, h and r are the bits of
    `sp_write_fwd` then `sp_read_fwd` of its output (so recompute replays and stage boundaries, which run the unfused
    pair, match the fused model), the reference's values to the dtype's tolerance, and the site's gradients through
    the fetched read equal the unfused site's bit for bit."""
    from mhc_kernels.single_pass import sp_read_fwd, sp_write_fwd
    from mhc_kernels.single_pass_fused import sp_write_read_fwd
    from mhc_train.ops.single_pass import Prefetch

    T, n, C = shape
    dt, rtol = DTYPES[dtype]
    state, y = _state(T, n, C, dt), _rand(T, C, dtype=dt)
    hp, hr, mix = _rand(T, n), torch.softmax(_rand(T, n, n), -1), torch.sigmoid(_rand(T, n))
    phi = _rand(n * C, n * n + 2 * n, scale=0.3)
    args = [t.detach() for t in (state, y, hp, hr, mix)]
    unfused = sp_write_fwd(*args)
    want = (unfused, *sp_read_fwd(unfused, phi.detach(), 1e-6))
    got = sp_write_read_fwd(*args, phi.detach(), 1e-6)
    for name, a, b in zip(("state", "F_in", "h", "r"), got, want):
        assert torch.equal(a, b), f"{name}: fused differs from the unfused pair"
    ref = single_pass_write_ref(*(t.double() for t in args))
    f_ref, h_ref = single_pass_read_ref(ref, phi.detach().double(), 1e-6)
    for name, a, b in (("state", got[0], ref), ("F_in", got[1], f_ref), ("h", got[2], h_ref)):
        assert_close(a, b, atol=rtol * b.abs().max().item(), what=name)

    def site_pair(fuse):  # write of site l, then site l+1's read of the state it wrote; their gradients
        ahead = Prefetch(phi, 1e-6) if fuse else None
        nxt = single_pass_write(state, y, hp, hr, mix, None, ahead)
        f_in, h, _ = single_pass_read(nxt, phi, 1e-6, ahead.take(nxt) if fuse else None)
        assert not fuse or ahead.take(nxt) is not None
        outs = (f_in, h)
        gs = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(o) for o in outs]
        return [*outs, *torch.autograd.grad(outs, [state, y, hp, hr, mix, phi], gs)]

    for i, (a, b) in enumerate(zip(site_pair(True), site_pair(False))):
        assert torch.equal(a, b), f"value / gradient {i}: fused differs from unfused"
