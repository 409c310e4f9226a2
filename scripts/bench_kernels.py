"""Benchmark the mHC kernels and the full mHC connection site, fwd and bwd, against the torch reference, torch.compile
of it, and the `hyper-connections` package's mHC module (a public peer).

    .venv/bin/python scripts/bench_kernels.py                          # CPU: demo shape, torch reference + peer
    python scripts/bench_kernels.py --shapes 4x4096x4096 demo 1.3b      # GPU: everything, plus per-kernel bandwidth
    .venv/bin/python scripts/bench_kernels.py --audit                  # any machine: memory-traffic audit only

Traffic audit (`--audit`, no GPU needed): one mHC site, one HC site (backend triton, F = identity, n = 4,
C = 4096, bf16 streams) and one single-pass site are run on `meta` tensors; every Triton launch (its tensor arguments,
as the compile gate records them) and every aten op that moves data (autograd's gradient sums, dtype conversions,
partial sums) is listed with its bytes read and written per token, forward and backward, next to the minimum: spec
section 6, (3n+1)C read and (n+1)C written forward in the stream dtype; backward [ours] (4n+2)C read and (n+1)C
written (one kernel reads g, x, y and writes dy; one after F's backward reads dF_in, g, x and writes the single dx).
Goal: <= 1.25x. The single-pass site (fp32 streams, deepseek_v4 numerics, the packed [n + 1, C] state; the middle
of three chained sites, so its read comes from the previous site's fused write and its write computes the next read)
is held to issue 27's forward target, (n + 1)C read and (n + 1)C written per token (<= 1.1x each), and to mHC's
backward minimum plus its mix row (C) written. Counted from arguments: a tile a kernel re-reads from L2 counts once;
the single-pass kernels get views of the packed state's rows they read. JSON: benchmarks/results/traffic_audit.json.

Per kernel (GPU only): time and effective bandwidth = minimal bytes read + written / time, as a fraction of the copy
bandwidth measured in the same run. Full site = coefficients + Sinkhorn + pre + post_res with F = identity, fwd+bwd.
Writes JSON to benchmarks/results/bench_kernels_<device>.json.
Targets (issue 4, H100): kernels 3 and 4 >= 80% of copy bandwidth; the full site fwd+bwd at B4 T4096 C4096 n4 in
<= 3 ms, >= 5x the torch reference and faster than its torch.compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # the audit records the GPU launch configs; set before triton loads

import torch  # noqa: E402

from mhc_train.config import ConnectionConfig  # noqa: E402
from mhc_train.model.connections import HCSite, MHCSite  # noqa: E402
from mhc_train.model.single_pass import MHCSinglePass  # noqa: E402

SHAPES = {"demo": (16, 128, 192), "1.3b": (1, 4096, 2048), "4x4096x4096": (4, 4096, 4096)}  # (batch, seq, C)


def bench(fn, device, iters=10) -> float:
    """Median seconds of fn()."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB (GPU) or 256 MiB (CPU) device-to-device copy: read + write."""
    n = (1 << 28) if device == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / bench(lambda: b.copy_(a), device)


def site_step(site, x, backend):
    site.backend = backend

    def run():
        out = site(x, lambda h: h)
        out.backward(torch.ones_like(out))

    return run


def peer_step(n, C, B, T, device, dtype):
    from hyper_connections.manifold_constrained_hyper_connections import ManifoldConstrainedHyperConnections

    mod = ManifoldConstrainedHyperConnections(n, dim=C, branch=torch.nn.Identity(), layer_index=0).to(device)
    x = torch.randn(B * n, T, C, device=device, dtype=dtype, requires_grad=True)

    def run():
        out = mod(x)
        out.backward(torch.ones_like(out))

    return run


def kernel_rows(B, T, C, n, device, bw, dtype, iters=10) -> dict:
    """Each kernel of a linked mHC site (what a model runs) alone: time, and bandwidth from its minimal bytes."""
    from mhc_kernels import projection, sinkhorn, stream_mix

    tok, es = B * T, torch.finfo(dtype).bits // 8
    x = torch.randn(tok, n, C, device=device, dtype=dtype)
    y = torch.randn(tok, C, device=device, dtype=dtype)
    hp, hr = torch.rand(tok, n, device=device), torch.rand(tok, n, n, device=device)
    g3, g2 = torch.randn_like(x), torch.randn_like(y)
    K_ = n * n + 2 * n
    phi = torch.randn(n * C, K_, device=device) * 0.01
    h, r = projection.projection_fwd(x, phi, 1e-6)
    gh = torch.randn_like(h)
    coeff = (n + n * n) * 4  # h_post and H_res, fp32
    cases = {  # name: (run, minimal bytes read + written)
        "pre_fwd": (lambda: stream_mix.mhc_pre_fwd(x, hp), tok * (n * C * es + n * 4 + C * es)),
        "pre_bwd": (  # linked: dh_pre only (x and dF_in read)
            lambda: stream_mix.mhc_pre_bwd(x, hp, g2, write_dx=False),
            tok * ((n + 1) * C * es + 2 * n * 4),
        ),
        "post_res_fwd": (lambda: stream_mix.mhc_post_res_fwd(x, y, hp, hr), tok * ((2 * n + 1) * C * es + coeff)),
        "post_res_bwd": (  # linked: g, x, y read; dy and the coefficient gradients written
            lambda: stream_mix.mhc_post_res_bwd(x, y, hp, hr, g3, write_dx=False),
            tok * ((2 * n + 2) * C * es + 2 * coeff),
        ),
        "projection_fwd": (lambda: projection.projection_fwd(x, phi, 1e-6), tok * (n * C * es + (K_ + 1) * 4)),
        "projection_bwd": (  # the site's one dx: x, g and dF_in read, dx written
            lambda: projection.projection_bwd(x, phi, h, r, gh, 0, True, g3, hr, g2, hp),
            tok * ((3 * n + 1) * C * es + (3 * K_ + 2 + n + n * n) * 4),
        ),
        "sinkhorn_fwd": (lambda: sinkhorn.sinkhorn_fwd(hr, 20), tok * 2 * n * n * 4),
        "sinkhorn_bwd": (lambda: sinkhorn.sinkhorn_bwd(hr, hr, 20), tok * 3 * n * n * 4),
    }
    out = {}
    for name, (fn, nbytes) in cases.items():
        t = bench(fn, device, iters)
        out[name] = {"ms": t * 1e3, "GB_s": nbytes / t / 1e9, "fraction_of_copy_bw": nbytes / t / bw}
    return out


def traffic_audit(arm: str, n: int = 4, C: int = 4096, dtype=torch.bfloat16, tokens: int = 4096) -> dict:
    """Bytes per token of every launched kernel and data-moving torch op of one site, forward and backward."""
    from mhc_train.ops.audit import record

    rows = n + 1 if arm == "mhc_single_pass" else n  # the single-pass state carries the read mix as row n
    x = None
    if arm == "mhc_single_pass":  # the arm's preset numerics; fp32 streams (it refuses bf16). A site inside the
        # model: three chained sites, the middle one counted; its read was computed by site 0's fused write, and its
        # write computes site 2's read (one stream pass per sub-layer boundary)
        dtype = torch.float32
        conn = MHCSinglePass(ConnectionConfig(type=arm, n_streams=n, backend="triton", numerics="deepseek_v4"))
        sites = [conn.site(C, k).to("meta") for k in range(3)]
        conn.chain_sites(sites)
        x0 = torch.empty(1, tokens, rows, C, device="meta", dtype=dtype, requires_grad=True)
        with record(torch_ops=False):  # not counted (meta tensors run nothing only inside a capture)
            x, site = sites[0](x0, lambda h: h), sites[1]
    else:
        site = (MHCSite if arm == "mhc" else HCSite)(C, n, 0, ConnectionConfig(type=arm, n_streams=n, backend="triton"))
        site = site.to("meta")
    x = torch.empty(1, tokens, rows, C, device="meta", dtype=dtype, requires_grad=True) if x is None else x
    with record(torch_ops=True) as fwd:
        out = site(x, lambda h: h)
    upstream = torch.empty_like(out)
    with record(torch_ops=True) as bwd:
        torch.autograd.grad(out, [x, *site.parameters()], upstream)
    es = torch.finfo(dtype).bits // 8
    minimum = {
        "forward": ((3 * n + 1) * C * es, (n + 1) * C * es),
        "backward": ((4 * n + 2) * C * es, (n + 1) * C * es),
    }
    if arm == "mhc_single_pass":  # forward: issue 27's target, (n + 1)C each way with the next site's read fused in;
        # backward [ours]: mHC's, plus the state's mix row written (its gradient is a row of the packed state)
        minimum = {
            "forward": ((n + 1) * C * es, (n + 1) * C * es),
            "backward": ((4 * n + 2) * C * es, (n + 2) * C * es),
        }
    result = {"arm": arm, "n": n, "C": C, "stream_dtype": str(dtype), "tokens": tokens}
    for phase, launches in (("forward", fwd), ("backward", bwd)):
        rows = []
        for launch in launches:
            r, w = launch.bytes_moved()
            rows.append({"kernel": launch.name, "read_B_per_token": r / tokens, "written_B_per_token": w / tokens})
        read = sum(row["read_B_per_token"] for row in rows)
        written = sum(row["written_B_per_token"] for row in rows)
        min_r, min_w = minimum[phase]
        result[phase] = {
            "kernels": rows,
            "launches": len(rows),
            "read_B_per_token": read,
            "written_B_per_token": written,
            "minimum_read_B_per_token": min_r,
            "minimum_written_B_per_token": min_w,
            "ratio_to_minimum": (read + written) / (min_r + min_w),
            "read_to_minimum": read / min_r,
            "written_to_minimum": written / min_w,
        }
    return result


def run_audit(out: Path) -> None:
    # 4096 tokens (one sequence) and 16384 (B4 T4096, the GPU timing shape): the weight-sized terms (phi, the
    # dphi partials and their sum) are per step, so their share per token shrinks with the tokens of a step
    arms = ("mhc", "hc", "mhc_single_pass")
    sites = [traffic_audit(arm, tokens=tokens) for tokens in (4096, 16384) for arm in arms]
    report = {"goal_ratio": 1.25, "sites": sites}
    for site in report["sites"]:
        for phase in ("forward", "backward"):
            ph = site[phase]
            print(
                f"{site['arm']:15s} {phase:8s} n{site['n']} C{site['C']} {site['stream_dtype']} {site['tokens']} tokens: "
                f"{ph['read_B_per_token']:.0f} B read + {ph['written_B_per_token']:.0f} B written per token over "
                f"{ph['launches']} launches; minimum {ph['minimum_read_B_per_token']} + "
                f"{ph['minimum_written_B_per_token']}: {ph['ratio_to_minimum']:.3f}x (goal <= 1.25x)"
            )
            for row in ph["kernels"]:
                print(
                    f"      {row['kernel']:28s} {row['read_B_per_token']:10.1f} R {row['written_B_per_token']:10.1f} W"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help=f"from {list(SHAPES)}")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="")
    p.add_argument("--audit", action="store_true", help="memory-traffic audit only (no timing; no GPU needed)")
    args = p.parse_args()
    if args.audit:
        return run_audit(Path(args.out or "benchmarks/results/traffic_audit.json"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" and device == "cuda" else torch.float32
    shapes = args.shapes or (list(SHAPES) if device == "cuda" else ["demo"])
    bw = copy_bandwidth(device)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "dtype": str(dtype),
        "n": args.n,
        "copy_bandwidth_GB_s": bw / 1e9,
        "shapes": {},
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"device {report['device']}, copy bandwidth {bw / 1e9:.1f} GB/s, dtype {dtype}")
    for shape in shapes:
        B, T, C = SHAPES[shape]
        n = args.n
        site = MHCSite(C, n, 0, ConnectionConfig(type="mhc", n_streams=n)).to(device)
        site.init_weights()
        x = torch.randn(B, T, n, C, device=device, dtype=dtype, requires_grad=True)
        rows = {"torch": bench(site_step(site, x, "torch"), device)}
        if device == "cuda":
            rows["triton"] = bench(site_step(site, x, "triton"), device)
            if not args.no_compile:
                site.backend = "torch"
                compiled = torch.compile(lambda v: site(v, lambda h: h))  # noqa: B023

                def run_compiled():
                    out = compiled(x)  # noqa: B023
                    out.backward(torch.ones_like(out))

                rows["torch_compile"] = bench(run_compiled, device)
        try:
            rows["hyper_connections_peer"] = bench(peer_step(n, C, B, T, device, dtype), device)
        except ImportError:
            print("  (hyper-connections not installed: pip install hyper-connections to compare with the peer)")
        entry = {"site_fwd_bwd_ms": {k: v * 1e3 for k, v in rows.items()}}
        if "triton" in rows:
            entry["speedup_vs_torch"] = rows["torch"] / rows["triton"]
            entry["kernels"] = kernel_rows(B, T, C, n, device, bw, dtype)
        report["shapes"][shape] = entry
        line = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in rows.items())
        print(f"{shape} (B{B} T{T} C{C} n{n}) full mHC site fwd+bwd: {line}")
        for name, k in entry.get("kernels", {}).items():
            print(
                f"    {name:15s} {k['ms']:.3f} ms  {k['GB_s']:.0f} GB/s  {100 * k['fraction_of_copy_bw']:.0f}% of copy"
            )
    out = Path(args.out or f"benchmarks/results/bench_kernels_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
