"""Forward+backward time and bytes saved for backward per token: residual vs HC vs mHC, DeepSeek-V4.1's single-pass
mHC (`mhc_single_pass`) and mHC with DeepSeek-V4's numerics (`mhc_deepseek_v4`), on the torch reference path.

    .venv/bin/python scripts/bench_connections.py                      # demo model, CPU
    .venv/bin/python scripts/bench_connections.py --model 125m --seq-len 1024 --batch 4 --device cuda

Prints a table and writes JSON to benchmarks/results/bench_connections_<device>.json.
Target (issue 2): mhc and hc at most 1.5x the residual step time at n = 4 on CPU, demo size. Each arm is a preset
under configs/connection/ at n = `--n-streams`; the ratios are against the residual measured in the same invocation
(the arms interleaved within every iteration), the only comparison a shared machine allows (`--note` says what
shared it; the 1-minute load average before and after is recorded). Wall time and the process's CPU time
(`time.process_time`) are both kept: the wall time includes waiting for a core, the CPU time does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where tools/ lives

from mhc_train.config import load_config  # noqa: E402
from mhc_train.model import build_model  # noqa: E402
from tools.measure import next_token_loss, saved_bytes_for_backward  # noqa: E402

ARMS = ("residual", "hc", "mhc", "mhc_single_pass", "mhc_deepseek_v4")


def time_interleaved(models: dict, tokens: dict, iters: int, warmup: int = 2) -> dict:
    """Per arm: median / p20 / p80 wall seconds and the median process CPU seconds of one forward+backward of the LM
    loss, the arms interleaved within every iteration (a burst of load on a shared machine hits all of them)."""
    wall: dict[str, list[float]] = {arm: [] for arm in models}
    cpu: dict[str, list[float]] = {arm: [] for arm in models}
    for i in range(warmup + iters):
        for arm, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            next_token_loss(model, tokens[arm]).backward()
            if tokens[arm].device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                wall[arm].append(time.perf_counter() - t0)
                cpu[arm].append(time.process_time() - c0)
            model.zero_grad(set_to_none=True)
    out = {}
    for arm, times in wall.items():
        q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
        out[arm] = {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[-1]}
        out[arm]["cpu_median_s"] = statistics.median(cpu[arm])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="a preset under configs/model/")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--note", default="", help="recorded in the JSON: what else ran on the machine")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    models, tokens = {}, {}
    for arm in ARMS:
        n = 1 if arm == "residual" else args.n_streams
        cfg = load_config(
            [
                f"model={args.model}",
                f"connection={arm}",
                f"connection.n_streams={n}",
                f"model.max_seq_len={args.seq_len + 1}",
            ]
        )
        models[arm] = build_model(cfg.model, cfg.connection, device=args.device)
        tokens[arm] = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), device=args.device)
    results = time_interleaved(models, tokens, args.iters)
    for arm, model in models.items():
        saved = saved_bytes_for_backward(lambda: next_token_loss(model, tokens[arm]), model.parameters())  # noqa: B023 (called within the iteration)
        results[arm].update(
            saved_bytes_per_token=saved / (args.batch * args.seq_len),
            n_params=sum(q.numel() for q in model.parameters()),
        )
    base = results["residual"]
    head = f"{'arm':15s} {'fwd+bwd ms':>11s} {'x residual':>10s} {'cpu x residual':>14s}"
    print(f"{head} {'saved B/token':>14s} {'x residual':>10s}")
    for arm, r in results.items():
        r["time_ratio_vs_residual"] = r["median_s"] / base["median_s"]
        r["cpu_time_ratio_vs_residual"] = r["cpu_median_s"] / base["cpu_median_s"]
        r["saved_ratio_vs_residual"] = r["saved_bytes_per_token"] / base["saved_bytes_per_token"]
        print(
            f"{arm:15s} {r['median_s'] * 1e3:11.1f} {r['time_ratio_vs_residual']:10.2f} "
            f"{r['cpu_time_ratio_vs_residual']:14.2f} "
            f"{r['saved_bytes_per_token']:14,.0f} {r['saved_ratio_vs_residual']:10.2f}"
        )
    out = Path(args.out or f"benchmarks/results/bench_connections_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "n_streams": args.n_streams,
        "backend": "torch reference",
        "target": "hc, mhc <= 1.5x residual time",
        "arms": "connection presets (configs/connection/<arm>.yaml); ratios against the residual of this invocation",
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": args.note,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
