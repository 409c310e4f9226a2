"""Unrolled vs implicit Sinkhorn backward: how far apart the gradients are, and what each costs.

    .venv/bin/python scripts/bench_sinkhorn_backward.py            # CPU (torch paths)
    python scripts/bench_sinkhorn_backward.py --tokens 65536        # GPU adds the fused Triton kernel (unrolled)

Relative gradient difference ||g_implicit - g_unrolled|| / ||g_unrolled|| for logits N(0, s^2) at t_max = 20 (and at
convergence), and fwd+bwd time per call. Writes benchmarks/results/bench_sinkhorn_backward_<device>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mhc_train import ops
from mhc_train.ops.sinkhorn import sinkhorn_knopp_implicit

try:
    from scripts.bench_kernels import bench
except ImportError:  # run as a file
    from bench_kernels import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16 * 128)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": device, "tokens": args.tokens, "n": args.n, "t_max": args.iters, "gradient": {}, "ms": {}}
    for scale in (0.1, 1.0, 3.0, 10.0):
        z = (torch.randn(args.tokens, args.n, args.n, dtype=torch.float64, device=device) * scale).requires_grad_()
        g = torch.randn_like(z)
        (gi,) = torch.autograd.grad((sinkhorn_knopp_implicit(z, args.iters) * g).sum(), z)
        (gu,) = torch.autograd.grad((ops.sinkhorn_knopp(z, args.iters) * g).sum(), z)
        col_err = (ops.sinkhorn_knopp(z.detach(), args.iters).sum(-2) - 1).abs().max().item()
        rel = ((gi - gu).norm() / gu.norm()).item()
        report["gradient"][f"N(0,{scale}^2)"] = {"relative_difference": rel, "column_error": col_err}
        print(
            f"logits N(0, {scale}^2), t_max={args.iters}: implicit vs unrolled gradient rel. diff {rel:.2e} "
            f"(Sinkhorn column error {col_err:.1e})"
        )
    z = torch.randn(args.tokens, args.n, args.n, device=device, requires_grad=True)
    g = torch.randn_like(z)
    paths = {
        "unrolled_torch": lambda t: ops.sinkhorn_knopp(t, args.iters, backend="torch"),
        "implicit_torch": lambda t: sinkhorn_knopp_implicit(t, args.iters),
    }
    if device == "cuda":
        paths["unrolled_triton"] = lambda t: ops.sinkhorn_knopp(t, args.iters, backend="triton")
    for name, fn in paths.items():
        report["ms"][name] = bench(lambda fn=fn: fn(z).backward(g), device) * 1e3
        print(f"{name:16s} fwd+bwd {report['ms'][name]:.3f} ms for {args.tokens} tokens")
    out = Path(f"benchmarks/results/bench_sinkhorn_backward_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
