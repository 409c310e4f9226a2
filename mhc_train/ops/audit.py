"""Record the kernel launches of one connection site on `meta` tensors: what the compile gate compiles and what the
traffic audit counts (scripts/check_kernels.py, scripts/bench_kernels.py). Nothing runs and nothing is allocated, so
any shape can be recorded on a machine without a GPU.

Axis legend: T tokens, n streams, C channels, K coefficient columns.
"""

from __future__ import annotations

import torch

from mhc_train import ops

ARMS = ("mhc", "mhc_identity", "hc", "sinkhorn")


def site_launches(
    arm: str,
    n: int,
    C: int,
    stream_dtype: torch.dtype = torch.bfloat16,
    tokens: int = 4096,
    deterministic: bool = False,
    sinkhorn_backward: str = "unrolled",
    t_max: int = 20,
):
    """(forward launches, backward launches) of one site with F = identity, through `mhc_train.ops` (backend triton).

    `arm`: mhc (projection, gates + Sinkhorn, pre, post_res), mhc_identity (no H_res), hc (pre and post_res: HC's
    coefficients are torch ops), sinkhorn (the standalone Sinkhorn op).
    """
    from mhc_kernels.utils import capture

    meta = dict(device="meta")

    def leaf(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, **meta).requires_grad_()

    with capture() as fwd:
        if arm == "sinkhorn":
            inputs = [leaf(tokens, n, n)]
            out = ops.sinkhorn_knopp(inputs[0], t_max, backend="triton")
        else:
            x = leaf(tokens, n, C, dtype=stream_dtype)
            if arm == "hc":
                h_pre, h_post, h_res = leaf(tokens, n), leaf(tokens, n), leaf(tokens, n, n)
                inputs = [x, h_pre, h_post, h_res]
            else:
                k = 2 * n if arm == "mhc_identity" else n * n + 2 * n
                phi, alpha, bias = leaf(n * C, k), leaf(2 if arm == "mhc_identity" else 3), leaf(k)
                inputs = [x, phi, alpha, bias]
                h_pre, h_post, h_res = ops.mhc_coefficients(
                    x,
                    phi,
                    alpha,
                    bias,
                    iters=t_max,
                    backend="triton",
                    deterministic=deterministic,
                    sinkhorn_backward=sinkhorn_backward,
                )
            y = ops.mhc_pre(x, h_pre, backend="triton")  # F = identity: y = F(F_in)
            out = ops.mhc_post_res(x, y, h_post, h_res, backend="triton")
    with capture() as bwd:
        torch.autograd.grad(out, inputs, torch.empty_like(out))
    return fwd, bwd


def traffic(launches) -> tuple[int, int]:
    """(read, written) bytes summed over launches, each tensor argument counted once per launch."""
    read = written = 0
    for launch in launches:
        r, w = launch.bytes_moved()
        read, written = read + r, written + w
    return read, written
