"""Decode speed with the KV cache (mhc-train generate's path): tokens/s for residual, HC, mHC, DeepSeek-V4.1's
single-pass mHC (`mhc_single_pass`) and mHC with DeepSeek-V4's numerics (`mhc_deepseek_v4`), and the ratio of each
arm's time per token to the residual's measured in the same invocation (the only comparison a shared machine allows).

    .venv/bin/python scripts/bench_generate.py                            # demo size, CPU, batch 1 and 8, 256 tokens
    .venv/bin/python scripts/bench_generate.py --batch 1 8 32 --new-tokens 512 --device cuda --model 125m

Randomly initialised models of the `--model` preset (decode cost does not depend on the weights); RoPE's table is
extended to prompt + new tokens (the demo preset's max_seq_len is 128, shorter than 256 new tokens; the table size
changes no parameter). Greedy, no EOS stop; the best of `--repeats` runs after a warm-up, the arms interleaved within
each repeat. Wall time and the process's CPU time (`time.process_time`, one torch thread) are both kept: on a
shared machine the wall time includes waiting for a core, the CPU time does not (the 1-minute load average before
and after is recorded). mHC runs twice:
Sinkhorn as the C loop (`mhc_train/infer/sinkhorn_cpu.py`, what generate uses on CPU) and as torch ops (its
fallback without a C compiler). The single-pass and deepseek_v4 arms have no C loop: their Sinkhorn runs as torch
ops (the single-pass site decodes as it trains; deepseek_v4 through `DeepseekDecodeSite`). Prints a table and writes
JSON to benchmarks/results/bench_generate_<device>.json (`--note`: what else ran on the machine).
Target (issue 16): mHC decode within 1.5x of the residual's time per token on CPU at demo size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhc_train.config import load_config  # noqa: E402
from mhc_train.infer.generate import SamplingConfig, generate  # noqa: E402
from mhc_train.infer.sinkhorn_cpu import native_sinkhorn  # noqa: E402
from mhc_train.model import build_model  # noqa: E402

# (arm, native): mHC runs twice, with Sinkhorn as the C loop (what generate uses) and as torch ops (the fallback)
VARIANTS = (
    ("residual", True),
    ("hc", True),
    ("mhc", True),
    ("mhc", False),
    ("mhc_single_pass", True),
    ("mhc_deepseek_v4", True),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny decode steps are dispatch-bound)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--note", default="", help="recorded in the JSON: what else ran on the machine")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = args.prompt_len + args.new_tokens
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    models = {}
    for arm in dict(VARIANTS):
        over = [f"model={args.model}", f"connection={arm}", f"model.max_seq_len={ctx}", f"train.seq_len={ctx}"]
        cfg = load_config(over)
        models[arm] = build_model(cfg.model, cfg.connection, seed=0, device=args.device).eval()
    c_loop = args.device == "cpu" and native_sinkhorn() is not None
    load_before = os.getloadavg()
    results = []
    for batch in args.batch:
        prompts = torch.randint(0, models["residual"].cfg.vocab_size, (batch, args.prompt_len)).tolist()
        warm = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
        for arm, native in VARIANTS:
            generate(models[arm], prompts, warm, native=native)
        wall, cpu = dict.fromkeys(VARIANTS, float("inf")), dict.fromkeys(VARIANTS, float("inf"))
        for _ in range(args.repeats):  # arms interleaved, so a burst of load on the shared machine hits all of them
            for v in VARIANTS:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                generate(models[v[0]], prompts, sampling, native=v[1])
                if args.device == "cuda":
                    torch.cuda.synchronize()
                wall[v] = min(wall[v], time.perf_counter() - t0)
                cpu[v] = min(cpu[v], time.process_time() - c0)
        for arm, native in VARIANTS:
            sinkhorn = None if arm in ("residual", "hc") else ("c" if arm == "mhc" and native and c_loop else "torch")
            results.append(
                {
                    "arm": arm,
                    "sinkhorn": sinkhorn,
                    "batch": batch,
                    "s_per_step": wall[arm, native] / args.new_tokens,
                    "cpu_s_per_step": cpu[arm, native] / args.new_tokens,
                    "tokens_per_s": batch * args.new_tokens / wall[arm, native],
                }  # fmt: skip
            )
    base = {r["batch"]: r for r in results if r["arm"] == "residual"}
    print(f"{'arm':>15} {'sinkhorn':>8} {'batch':>5} {'ms/step':>8} {'tokens/s':>9} {'vs residual':>11} "
          f"{'cpu ms/step':>11} {'cpu vs residual':>15}")  # fmt: skip
    for r in results:
        r["time_vs_residual"] = r["s_per_step"] / base[r["batch"]]["s_per_step"]
        r["cpu_time_vs_residual"] = r["cpu_s_per_step"] / base[r["batch"]]["cpu_s_per_step"]
        print(f"{r['arm']:>15} {r['sinkhorn'] or '-':>8} {r['batch']:>5} {r['s_per_step'] * 1e3:>8.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['time_vs_residual']:>10.2f}x {r['cpu_s_per_step'] * 1e3:>11.2f} "
              f"{r['cpu_time_vs_residual']:>14.2f}x")  # fmt: skip
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"bench_generate_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items()}
    meta.update(torch=torch.__version__, machine=platform.processor() or platform.machine(), target_ratio=1.5)
    meta.update(ratios="each arm against the residual of this invocation, the arms interleaved in every repeat")
    meta.update(cpus=os.cpu_count(), load_avg_1min=[round(load_before[0], 2), round(os.getloadavg()[0], 2)])
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
