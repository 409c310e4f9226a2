"""Scale-out memory benchmark (issue 24): `mhc-train plan` at 7B / 13B on 8-64 GPUs, set-up peaks measured on the fake
process group where a rank's share fits this machine, and plan vs measurement at 2 gloo ranks on a small shape.
Writes benchmarks/results/bench_scale.json.

    .venv/bin/python scripts/bench_scale.py [--setup 7b:64,13b:64] [--skip-gloo]

- `plans`: every sharded preset at 7B and 13B mHC (n = 4, seq 4096, one sequence per GPU) on 8, 16, 64 GPUs: the
  plan's per-GPU GiB (the largest rank) and verdict against 80 GB; replicated presets (ddp, zero1, zero2) by plan only.
- `setup`: the per-rank set-up peak of live tensor bytes (`mhc_train.plan.measure.measure_setup`: rank 0 builds its
  engine under the fake process group, its shards really allocated and filled) for the (model:world) pairs given,
  next to the plan's params term. FSDP presets only (DeepSpeed cannot initialise under a fake process group; the
  pipeline builds the whole model on every rank today, which does not fit 24 GiB).
- `gloo`: at 2 gloo ranks and a small shape, each rank's measured peak of a training step vs the plan's prediction.
- `checkpoint`: left for the checkpoint benchmark of issue 24 (bytes read per rank during a save, sync vs async
  save time); null here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from mhc_train.config import load_config  # noqa: E402
from mhc_train.plan import make_plan  # noqa: E402
from mhc_train.plan.measure import measure_setup  # noqa: E402
from mhc_train.plan.table import fit_rows, overrides  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "bench_scale.json"
SHARDED = ("fsdp", "fsdp_recompute", "zero3", "pp_fsdp")
REPLICATED = ("ddp", "zero1", "zero2")
SMALL = [
    "model=test", "train=test", "model.dim=128", "model.n_layer=4", "model.n_head=4", "model.vocab_size=2048",
    "model.max_seq_len=128", "train.seq_len=128", "train.batch_size=4", "train.device=cpu", "train.precision=fp32",
    "logging.wandb=false", "train.grad_accum=1",
]  # fmt: skip
GLOO_PRESETS = ("fsdp", "ddp", "pp_1f1b", "fsdp_recompute")
GIB = 2**30


def setups(pairs: list[str]) -> list[dict]:
    out = []
    for pair in pairs:
        model, world = pair.split(":")
        for preset in ("fsdp", "fsdp_recompute"):
            ov = overrides(model, preset, int(world))
            cfg = load_config(ov)
            t0 = time.perf_counter()
            got = measure_setup(cfg, int(world))
            plan = make_plan(cfg, int(world))
            out.append({"model": model, "preset": preset, "world": int(world), "set_up_peak_gib": got["set_up_peak"] / GIB,
                        "held_after_gib": got["held_after"] / GIB, "plan_params_gib": plan["per_gpu_gib"]["params"],
                        "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
            print(out[-1], flush=True)
    return out


def gloo(nproc: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29631",
               "-m", "mhc_train.plan.measure", "--presets", ",".join(GLOO_PRESETS), *SMALL]  # fmt: skip
        env = {**os.environ, "PLAN_MEASURE_OUT": tmp, "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    out = []
    for preset in GLOO_PRESETS:
        plan = make_plan(load_config([*SMALL, f"parallel={preset}"]), nproc)
        measured = [r[preset]["peak"] for r in ranks]
        pred = plan["bytes"]["total"]
        out.append({"preset": preset, "world": nproc, "measured_peak_mib": [m / 2**20 for m in measured],
                    "predicted_peak_mib": pred / 2**20, "ratio": pred / max(measured)})  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default="7b:64", help="model:world pairs whose set-up peak is measured (comma list)")
    p.add_argument("--skip-gloo", action="store_true")
    args = p.parse_args()
    t0 = time.perf_counter()
    plans = fit_rows(["7b", "13b"], [8, 16, 64], presets=(*SHARDED, *REPLICATED))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "device_gib": 80.0,
        "plans": plans,
        "setup": setups([s for s in args.setup.split(",") if s]),
        "gloo": [] if args.skip_gloo else gloo(),
        "checkpoint": None,  # bytes read per rank during a save, sync vs async save time: the checkpoint benchmark
        "wall_s": None,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
