"""Activation bytes kept for backward per token under each recompute mode, and what recompute costs.

    .venv/bin/python scripts/bench_recompute.py                       # 1.3B preset at seq 4096 (memory model)
    .venv/bin/python scripts/bench_recompute.py --model 350m --seq-len 2048

Memory: per-component bytes are measured on one block of the real width (CPU, short sequence: every term is per
token), then composed for the full depth by mhc_train.parallel.memory (the composition is tested against whole-model
measurements). Time: fwd+bwd of the demo model on CPU with recompute none / mhc / full. Writes JSON to
benchmarks/results/bench_recompute.json.
Target (issue 5): mhc with recompute keeps <= 1.25x the residual baseline's activation bytes, F never recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where tools/ lives

from mhc_train.config import load_config  # noqa: E402
from mhc_train.model import build_model  # noqa: E402
from mhc_train.model.transformer import ffn_hidden_dim  # noqa: E402
from mhc_train.parallel import apply_recompute, optimal_block, plan_blocks  # noqa: E402
from tools.measure import time_fwd_bwd  # noqa: E402
from tools.memory_model import component_bytes, predict_bytes_per_token, transient_peak_bytes_per_token  # noqa: E402


def recompute_flops_per_token(n: int, C: int, n_layer: int) -> dict:
    """Matmul FLOPs per token that mhc-mode recompute adds: the block replay and one site pass with gradient."""
    K = n * n + 2 * n
    coeff = 2 * n * C * K  # v @ phi
    post_res, pre = 2 * n * n * C + 2 * n * C, 2 * n * C
    extra_site = (coeff + post_res) + (coeff + pre + post_res)  # the no-grad replay, then the site with gradient
    return {"extra_per_site": extra_site, "extra_total": extra_site * 2 * n_layer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--time-model", default="demo", help="preset timed on CPU for the step-time cost")
    p.add_argument("--out", default="benchmarks/results/bench_recompute.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {
        "model": args.model,
        "seq_len": args.seq_len,
        "n_streams": args.n_streams,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "memory": {},
        "time": {},
    }

    # ---- memory: components of one block at full width, composed to full depth ----
    full_cfg = load_config([f"model={args.model}", "connection=mhc", f"connection.n_streams={args.n_streams}"])
    L_blocks, C = full_cfg.model.n_layer, full_cfg.model.dim
    one_block = dataclasses.replace(full_cfg.model, n_layer=1, max_seq_len=65)
    rows = {}
    for arm, n in (("residual", 1), ("mhc", args.n_streams)):
        cfg = load_config([f"model={args.model}", f"connection={arm}", f"connection.n_streams={n}"])
        model = build_model(one_block, cfg.connection, seed=0)
        comp = component_bytes(model, batch=1, seq_len=64)
        del model
        sites = 2 * L_blocks
        modes = [("none", "auto")] if arm == "residual" else [("none", "auto"), ("mhc", "auto"), ("full", "auto")]
        for mode, block in modes:
            plan = plan_blocks(sites, n, block)
            pred = predict_bytes_per_token(comp, L_blocks, n, C, mode, plan)
            rows[f"{arm}/{mode}"] = {**pred, "blocks": len(plan), "L_r": plan[0][1] - plan[0][0]}
    base = rows["residual/none"]["total"]
    for r in rows.values():
        r["ratio_vs_residual"] = r["total"] / base
    L_r = optimal_block(args.n_streams, 2 * L_blocks)
    report["memory"] = rows
    report["memory_seq_total_GiB"] = {k: r["total"] * args.seq_len / 2**30 for k, r in rows.items()}
    report["eq20_peak_bytes_per_token"] = transient_peak_bytes_per_token(args.n_streams, C, L_blocks, L_r, 4)
    f_flops = L_blocks * (2 * (4 * C * C) + 4 * args.seq_len * C + 2 * 3 * C * ffn_hidden_dim(full_cfg.model))
    extra = recompute_flops_per_token(args.n_streams, C, L_blocks)
    report["flops_per_token"] = {
        "forward_blocks": f_flops,
        "recompute_extra": extra["extra_total"],
        "recompute_extra_fraction_of_forward": extra["extra_total"] / f_flops,
    }
    print(f"{args.model} at seq {args.seq_len}, n = {args.n_streams}, fp32 activations, per token:")
    for key, r in rows.items():
        print(
            f"  {key:14s} {r['total'] / 1024:10.1f} KiB  ({r['ratio_vs_residual']:.3f}x residual; "
            f"L_r={r['L_r']}, {r['blocks']} blocks)"
        )
    print(
        f"  recompute adds {extra['extra_total'] / 1e6:.1f} MFLOP/token forward "
        f"({100 * report['flops_per_token']['recompute_extra_fraction_of_forward']:.2f}% of the blocks' forward)"
    )

    # ---- time: the demo model on CPU ----
    tcfg = load_config([f"model={args.time_model}", "connection=mhc", "model.max_seq_len=129"])
    model = build_model(tcfg.model, tcfg.connection, seed=0)
    tokens = torch.randint(0, tcfg.model.vocab_size, (16, 129))
    for mode in ("none", "mhc", "full"):
        apply_recompute(model, mode, "auto")
        report["time"][mode] = time_fwd_bwd(model, tokens, iters=5)
    for mode in ("mhc", "full"):
        report["time"][mode]["ratio_vs_none"] = report["time"][mode]["median_s"] / report["time"]["none"]["median_s"]
        print(
            f"  CPU {args.time_model} fwd+bwd, recompute={mode}: "
            f"{report['time'][mode]['ratio_vs_none']:.2f}x the time of recompute=none"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
