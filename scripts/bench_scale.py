"""Scale-out memory benchmark (issue 24): `mhc-train plan` at 7B / 13B on 8-64 GPUs, set-up peaks measured on the fake
process group where a rank's share fits this machine, and plan vs measurement at 2 gloo ranks on a small shape.
Writes benchmarks/results/bench_scale.json.

    .venv/bin/python scripts/bench_scale.py [--setup 7b:64,13b:64] [--skip-gloo] [--only-checkpoint]

- `plans`: every sharded preset at 7B and 13B mHC (n = 4, seq 4096, one sequence per GPU) on 8, 16, 64 GPUs: the
  plan's per-GPU GiB (the largest rank) and verdict against 80 GB; replicated presets (ddp, zero1, zero2) by plan only.
- `setup`: the per-rank set-up peak of live tensor bytes (`mhc_train.plan.measure.measure_setup`: rank 0 builds its
  engine under the fake process group, its shards really allocated and filled) for the (model:world) pairs given,
  next to the plan's params term. FSDP presets only (DeepSpeed cannot initialise under a fake process group; the
  pipeline builds the whole model on every rank today, which does not fit 24 GiB).
- `gloo`: at 2 gloo ranks and a small shape, each rank's measured peak of a training step vs the plan's prediction.
- `checkpoint`: at 2 gloo ranks, FSDP, DCP, a ~7M-parameter model (~80 MiB of weights and AdamW moments): the bytes
  each rank read during a synchronous and an asynchronous save (by kind: its own shards, another rank's, DCP's metadata,
  the step file) and the time each save held the training loop, with the async save's background write time
  (`scripts/bench_checkpoint_scale.py`, one torchrun). `--only-checkpoint` runs this part alone and merges it into the
  existing JSON.
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
CKPT_SHAPE = [
    *SMALL[:2], "model.dim=256", "model.n_layer=6", "model.n_head=4", "model.vocab_size=4096", "model.max_seq_len=64",
    "train.seq_len=64", "train.batch_size=2", *SMALL[9:], "parallel=fsdp", "checkpoint.format=dcp",
]  # fmt: skip
GIB, MIB = 2**30, 2**20


def setups(pairs: list[str]) -> list[dict]:
    out = []
    for pair in pairs:
        model, world = pair.split(":")
        for preset in ("fsdp", "fsdp_recompute", "pp_fsdp"):
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


def checkpoint(nproc: int = 2) -> dict:
    """Bytes read per rank and blocking time of sync vs async DCP saves at `nproc` gloo ranks (module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29632",
               "-m", "scripts.bench_checkpoint_scale", *CKPT_SHAPE]  # fmt: skip
        env = {**os.environ, "BENCH_CKPT_OUT": tmp, "PYTHONPATH": str(REPO)}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"checkpoint benchmark failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    per_rank = [_rank_summary(r) for r in ranks]
    out = {"world": nproc, "engine": "fsdp", "format": "dcp", "overrides": CKPT_SHAPE, "n_params": ranks[0]["n_params"],
           "checkpoint_mib": ranks[0]["checkpoint_bytes"] / MIB, "step_s": [r["step_s"] for r in ranks],
           "rank0_read_other_shards_mib": max(per_rank[0][m]["read_mib"]["other"] for m in ("sync", "async")),
           "note": "per_rank: each mode's last (warm) save; sync block_s is the whole save (write, own digests, step file); "
                   "async block_s is staging and the write's start, background_s submission to commit while "
                   "training steps ran beside it (overlap_step_s vs step_s); raw: every save",
           "per_rank": per_rank, "raw": ranks}  # fmt: skip
    for s in per_rank:
        print({k: s[k] for k in ("rank", "own_shard_mib", "sync", "async")}, flush=True)
    return out


def _rank_summary(r: dict) -> dict:
    """One rank's last (warm) save of each mode, in MiB and seconds."""
    sync, asyn = r["sync"][-1], r["async"][-1]

    def mib(save):
        return {k: round(v / MIB, 3) for k, v in save["read_bytes"].items()}

    return {"rank": r["rank"], "own_shard_mib": round(r["own_shard_bytes"] / MIB, 3),
            "sync": {"read_mib": mib(sync), "block_s": round(sync["block_s"], 3)},
            "async": {"read_mib": mib(asyn), "block_s": round(asyn["block_s"], 3),
                      "background_s": round(asyn["background_s"], 3), "wait_s": round(asyn["wait_s"], 3),
                      "overlap_step_s": round(asyn["overlap_step_s"], 3), "step_s": round(r["step_s"], 3)}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", default="7b:64", help="model:world pairs whose set-up peak is measured (comma list)")
    p.add_argument("--skip-gloo", action="store_true")
    p.add_argument("--only-checkpoint", action="store_true", help="the checkpoint part alone, merged into the JSON")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.only_checkpoint:
        result = json.loads(OUT.read_text()) if OUT.is_file() else {}
        result["checkpoint"] = checkpoint()
        result["checkpoint"]["wall_s"] = round(time.perf_counter() - t0, 1)
        OUT.write_text(json.dumps(result, indent=1))
        print(f"wrote {OUT} (checkpoint part)")
        return
    plans = fit_rows(["7b", "13b"], [8, 16, 64], presets=(*SHARDED, *REPLICATED))
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "device_gib": 80.0,
        "plans": plans,
        "setup": setups([s for s in args.setup.split(",") if s]),
        "gloo": [] if args.skip_gloo else gloo(),
        "checkpoint": checkpoint(),
        "wall_s": None,
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    OUT.write_text(json.dumps(result, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
