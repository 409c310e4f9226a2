"""Record the kernel launches of one connection site on `meta` tensors: what the compile gate compiles and what the
traffic audit counts (scripts/check_kernels.py, scripts/bench_kernels.py). Nothing runs and nothing is allocated, so
any shape can be recorded on a machine without a GPU.

Axis legend: T tokens, n streams, C channels, K coefficient columns.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mhc_train import ops
from mhc_train.ops import library, library_gates

ARMS = ("mhc", "mhc_identity", "hc", "sinkhorn", "mhc_single_pass")


_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


class TorchOp:
    """One aten op run outside the Triton kernels (autograd's gradient sums, dtype conversions, reductions of
    partials), with the bytes of its tensor arguments (read) and results (written): the audit counts these too."""

    def __init__(self, name: str, read: int, written: int):
        self.name, self._bytes = name, (read, written)

    def bytes_moved(self) -> tuple[int, int]:
        return self._bytes


def _python_impl(op: torch._ops.OpOverload):
    """The Python implementation behind one of the `mhc_train::` kernel ops."""
    return (getattr(library, op._opname, None) or getattr(library_gates, op._opname))._init_fn


class _RecordTorchOps(TorchDispatchMode):
    """Appends a TorchOp for every aten op that moves data; views and bare allocations move none. The `mhc_train::`
    kernel ops run their Python implementation under the mode (their launches are recorded by the capture)."""

    def __init__(self, into: list):
        super().__init__()
        self.into = into

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == library.NS:  # a kernel op: record its launches and the aten ops inside it instead
            with self:
                return _python_impl(func)(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        returns = func._schema.returns
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if name not in _ALLOCATIONS and not is_view:

            def size(tree):
                return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

            self.into.append(TorchOp(f"aten.{name}", size((args, kwargs or {})), size(out)))
        return out


@contextlib.contextmanager
def record(torch_ops: bool, alternates: bool = False):
    """Triton launches (kernels.utils.capture), plus the torch ops around them when `torch_ops`, plus the autotune
    candidates not picked when `alternates` (the compile gate compiles them all; the audit counts what runs)."""
    from mhc_kernels.utils import capture

    with capture(alternates) as launches:
        if torch_ops:
            with _RecordTorchOps(launches):
                yield launches
        else:
            yield launches


def site_launches(
    arm: str,
    n: int,
    C: int,
    stream_dtype: torch.dtype = torch.bfloat16,
    tokens: int = 4096,
    sinkhorn_backward: str = "unrolled",
    t_max: int = 20,
    torch_ops: bool = False,
    chain: bool = True,
    alternates: bool = False,
    split_backward: bool = False,
):
    """(forward launches, backward launches) of one site with F = identity, run by the site step on the triton backend.

    `arm`: mhc (projection, gates + Sinkhorn, pre, post_res), mhc_identity (no H_res), hc (dynamic HC: the per-stream
    projection, HC's gates, pre and post_res), sinkhorn (the standalone Sinkhorn op). `torch_ops=True` also records
    every aten op that moves data (as `TorchOp`s, in order with the launches): what the traffic audit counts.
    `chain=True` links the site's ops as a model site does (one dx per site); False runs each op unlinked.
    mhc_single_pass: the arm's fused read and write on the packed state [T, n + 1, C] (`single_pass.py`), its
    coefficient tail by `sinkhorn_backward`: unrolled (the paper's numerics: the gates + Sinkhorn kernel) or
    `deepseek_v4` (DeepSeek's torch tail, the arm's preset); `chain=True`: its write fused with the next site's read
    (single_pass_fused.py; a site inside the model), False: the plain write (a stage's or the model's last site).
    """
    meta = dict(device="meta")

    def leaf(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, **meta).requires_grad_()

    with record(torch_ops, alternates) as fwd:
        if arm == "mhc_single_pass":
            inputs, out = _single_pass_site(leaf, n, C, stream_dtype, tokens, t_max, sinkhorn_backward, chain)
        elif arm == "sinkhorn":
            inputs = [leaf(tokens, n, n)]
            out = ops.sinkhorn_knopp(inputs[0], t_max, backend="triton")
        else:
            x = leaf(tokens, n, C, dtype=stream_dtype)
            if arm == "hc":  # dynamic HC: the per-stream projection, then HC's gates
                weight, static, scale = leaf(C, n + 2), leaf(n, n + 2), leaf(n + 2)
                inputs = [x, weight, static, scale]

                def coefficients(x, k):
                    return k.hc_gates(k.hc_projection(x, weight), static, scale)
            else:
                k = 2 * n if arm == "mhc_identity" else n * n + 2 * n
                phi, alpha, bias = leaf(n * C, k), leaf(2 if arm == "mhc_identity" else 3), leaf(k)
                inputs = [x, phi, alpha, bias]

                def coefficients(x, k):
                    return k.mhc_coefficients(x, phi, alpha, bias, t_max, sinkhorn_backward=sinkhorn_backward)

            out, _ = ops.SiteStep("triton")(coefficients, x, lambda f_in: f_in, linked=chain)  # F = identity
    upstream = torch.empty_like(out)
    with record(torch_ops, alternates) as bwd:
        if split_backward and arm != "sinkhorn":  # as ZBV / DualPipeV run it: input gradients, then weight gradients
            torch.autograd.grad(out, inputs[:1], upstream, retain_graph=True)
            torch.autograd.grad(out, inputs[1:], upstream)
        else:
            torch.autograd.grad(out, inputs, upstream)
    return fwd, bwd


def traffic(launches) -> tuple[int, int]:
    """(read, written) bytes summed over launches, each tensor argument counted once per launch."""
    read = written = 0
    for launch in launches:
        r, w = launch.bytes_moved()
        read, written = read + r, written + w
    return read, written


def _single_pass_site(leaf, n, C, stream_dtype, tokens, t_max, tail, fuse_next: bool = False):
    """(inputs, output) of one single-pass site with F = identity on the triton backend (`site_launches`); with
    `fuse_next` its write also computes the next site's read (that site's phi: an extra input)."""
    from .single_pass import Prefetch, SinglePassKernels, single_pass_write

    k = n * n + 2 * n
    state, phi, alpha, bias = leaf(tokens, n + 1, C, dtype=stream_dtype), leaf(n * C, k), leaf(3), leaf(k)
    kernels = SinglePassKernels(ops.resolve("triton", "meta"), state)
    x = state[..., :n, :]
    with kernels.backend.coefficient_region(x):
        if tail == "deepseek_v4":
            h_pre, h_post, h_res = kernels.mhc_coefficients_deepseek(x, phi, alpha, bias, t_max, 1e-6, 1e-6)
        else:
            h_pre, h_post, h_res = kernels.mhc_coefficients(x, phi, alpha, bias, t_max, 1e-6, tail)
    ahead = Prefetch(leaf(n * C, k), 1e-6) if fuse_next else None
    return [state, phi, alpha, bias], single_pass_write(state, kernels.f_in, h_post, h_res, h_pre, kernels.link, ahead)
