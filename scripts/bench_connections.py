"""Forward+backward time and bytes saved for backward per token: residual vs HC vs mHC (torch reference path).

    .venv/bin/python scripts/bench_connections.py                      # demo model, CPU
    .venv/bin/python scripts/bench_connections.py --model 125m --seq-len 1024 --batch 4 --device cuda

Prints a table and writes JSON to benchmarks/results/bench_connections_<device>.json.
Target (issue 2): mhc and hc at most 1.5x the residual step time at n = 4 on CPU, demo size.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where tools/ lives

from mhc_train.config import load_config  # noqa: E402
from mhc_train.model import build_model  # noqa: E402
from tools.measure import next_token_loss, saved_bytes_for_backward, time_fwd_bwd  # noqa: E402

ARMS = ("residual", "hc", "mhc")


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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
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
        model = build_model(cfg.model, cfg.connection, device=args.device)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq_len + 1), device=args.device)
        timing = time_fwd_bwd(model, tokens, iters=args.iters)
        saved = saved_bytes_for_backward(lambda: next_token_loss(model, tokens), model.parameters())  # noqa: B023 (called within the iteration)
        results[arm] = {
            **timing,
            "saved_bytes_per_token": saved / (args.batch * args.seq_len),
            "n_params": sum(q.numel() for q in model.parameters()),
        }
    base = results["residual"]
    print(f"{'arm':10s} {'fwd+bwd ms':>11s} {'x residual':>10s} {'saved B/token':>14s} {'x residual':>10s}")
    for arm, r in results.items():
        r["time_ratio_vs_residual"] = r["median_s"] / base["median_s"]
        r["saved_ratio_vs_residual"] = r["saved_bytes_per_token"] / base["saved_bytes_per_token"]
        print(
            f"{arm:10s} {r['median_s'] * 1e3:11.1f} {r['time_ratio_vs_residual']:10.2f} "
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
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
