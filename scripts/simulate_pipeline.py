"""Simulate 1F1B, ZBV and DualPipeV for residual vs mHC: bubble, exposed communication, peak activations per rank.

    .venv/bin/python scripts/simulate_pipeline.py --pp 4 --microbatches 16
    .venv/bin/python scripts/simulate_pipeline.py --pp 8 --microbatches 32 --f-ms 40 --dim 4096 --bandwidth-gbs 25

Costs are for the whole model and one micro-batch (each of the P or 2P stage chunks gets its share); measure them
with scripts/bench_connections.py or a profiler. The boundary carries [micro-batch, seq, n, C] stream states:
n times the residual baseline's bytes. mHC's compute overhead is `--mhc-overhead` (the paper: 1.067).
Writes benchmarks/results/simulate_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where tools/ lives

from tools.pipeline_sim import SCHEDULES, Costs, simulate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--f-ms", type=float, default=24.0, help="forward of the whole model, one micro-batch")
    p.add_argument("--i-ms", type=float, default=24.0, help="backward for inputs, whole model")
    p.add_argument("--w-ms", type=float, default=24.0, help="backward for weights, whole model")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--bytes-per-elem", type=int, default=2)
    p.add_argument("--bandwidth-gbs", type=float, default=25.0, help="stage-to-stage link, GB/s")
    p.add_argument("--latency-ms", type=float, default=0.02)
    p.add_argument("--act-gib", type=float, default=8.0, help="activations the whole model keeps per micro-batch")
    p.add_argument("--mhc-overhead", type=float, default=1.067, help="mHC compute time / residual compute time")
    args = p.parse_args()
    results = {}
    print(f"P={args.pp}, M={args.microbatches}; boundary = micro-batch x seq x n x C x {args.bytes_per_elem} B")
    print(
        f"{'arm':9s} {'schedule':10s} {'makespan ms':>12s} {'bubble':>7s} {'exposed comm ms':>16s} "
        f"{'peak act GiB/rank':>18s} {'boundary MiB':>13s}"
    )
    for arm, n, overhead in (("residual", 1, 1.0), ("mhc", args.n, args.mhc_overhead)):
        boundary = args.micro_batch * args.seq * n * args.dim * args.bytes_per_elem
        comm = boundary / (args.bandwidth_gbs * 1e9) * 1e3 + args.latency_ms
        for sched in SCHEDULES:
            chunks = args.pp * (1 if sched == "1f1b" else 2)
            costs = Costs(
                args.f_ms * overhead / chunks,
                args.i_ms * overhead / chunks,
                args.w_ms * overhead / chunks,
                comm,
                args.act_gib / chunks,
            )
            r = simulate(sched, args.pp, args.microbatches, costs)
            r["boundary_MiB"] = boundary / 2**20
            results[f"{arm}/{sched}"] = r
            print(
                f"{arm:9s} {sched:10s} {r['makespan']:12.1f} {r['bubble_fraction']:7.1%} {r['exposed_comm']:16.2f} "
                f"{max(r['peak_act_bytes']):18.2f} {r['boundary_MiB']:13.1f}"
            )
    out = Path("benchmarks/results/simulate_pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
