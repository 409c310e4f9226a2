"""What checkpoint verification costs: write, verify and load one step file of a model preset, and a resume.

A step file (weights + AdamW moments, as `checkpoint.format=file` writes it) of `--model` is written through
`CheckpointManager.write` (which appends the digest footer and reads the file back to verify it), then read the way a
resume reads it. Printed and written to JSON: MiB, write / verify / torch.load seconds, verification MiB/s, and what
verification adds to a resume (building the model and optimizer, loading the step file with its digest checked
alongside, loading the states) over the same resume without it. The page cache is warm (the file was just written): the worst case for verification's share, since a
cold read makes torch.load slower and leaves the hash the same. Where the page cache can be dropped (root on Linux),
the cold case is measured too: the load alone after a drop, and the verified load after a drop.

    .venv/bin/python scripts/bench_checkpoint.py --model 125m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mhc_train.checkpoint import CheckpointManager
from mhc_train.checkpoint.integrity import verify_file
from mhc_train.config import CheckpointConfig, ConnectionConfig, OptimConfig, load_config
from mhc_train.model import build_model
from mhc_train.optim import build_optimizer
from mhc_train.parallel.state import load_optimizer_state_by_name, optimizer_state_by_name


def _state(model_cfg, conn: ConnectionConfig) -> dict:
    model = build_model(model_cfg, conn, seed=0)
    opt = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # AdamW moments as after a step
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
    names = {p: n for n, p in model.named_parameters()}
    sched = {"last_epoch": 1}
    state = {"model": model.state_dict(), "optimizer": optimizer_state_by_name(opt, names), "scheduler": sched}
    return {**state, "step": 1, "rng": {}, "config": {}}


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _cold(path: Path) -> dict:
    """Cold-cache timings ({} where the page cache cannot be dropped)."""
    if not _drop_caches():
        return {}
    t0 = time.perf_counter()
    CheckpointManager.load(path, verify=False)
    load_s = time.perf_counter() - t0
    _drop_caches()
    t0 = time.perf_counter()
    CheckpointManager.load(path)  # verified alongside
    both_s = time.perf_counter() - t0
    return {"cold_load_s": load_s, "cold_verify_then_load_s": both_s, "cold_overhead": both_s / load_s - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="125m", help="a configs/model preset")
    p.add_argument("--connection", default="mhc")
    p.add_argument("--out", default="benchmarks/results/bench_checkpoint_cpu.json")
    args = p.parse_args()
    cfg = load_config([f"model={args.model}", f"connection={args.connection}", "connection.backend=torch"])
    state = _state(cfg.model, cfg.connection)
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(tmp, CheckpointConfig())
        t0 = time.perf_counter()
        path = manager.write(1, state)  # torch.save + footer + read-back verification
        write_s = time.perf_counter() - t0
        del state
        mib = path.stat().st_size / 2**20

        t0 = time.perf_counter()  # a resume: model and optimizer built, the step file loaded into them
        model = build_model(cfg.model, cfg.connection, seed=0)
        opt = build_optimizer(model, cfg.optim)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_file(path)
        verify_s = time.perf_counter() - t0  # alone, for its throughput
        plain, verified = [], []
        for _ in range(3):  # alternating, medians
            t0 = time.perf_counter()
            CheckpointManager.load(path, verify=False)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded = CheckpointManager.load(path)  # verified alongside, as a resume does
            verified.append(time.perf_counter() - t0)
        load_s, verified_load_s = statistics.median(plain), statistics.median(verified)
        t0 = time.perf_counter()
        model.load_state_dict(loaded["model"])
        load_optimizer_state_by_name(opt, loaded["optimizer"], {p: n for n, p in model.named_parameters()})
        apply_s = time.perf_counter() - t0
        cold = _cold(path)
    resume_s = build_s + load_s + apply_s  # without verification
    added_s = verified_load_s - load_s
    report = {
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "connection": args.connection,
        "step_file_mib": mib,
        "write_s": write_s,
        "verify_s": verify_s,
        "verify_mib_per_s": mib / verify_s,
        "torch_load_s": load_s,
        "verified_load_s": verified_load_s,
        "resume_without_verification_s": resume_s,
        "verification_adds_to_resume": added_s / resume_s,
        **cold,
    }
    print(
        f"{args.model} {args.connection}: step file {mib:,.0f} MiB; write {write_s:.2f} s (incl. read-back "
        f"verification); verify {verify_s:.2f} s = {mib / verify_s:,.0f} MiB/s; torch.load {load_s:.2f} s; "
        f"verified load {verified_load_s:.2f} s; resume {resume_s:.2f} s without verification, "
        f"{100 * added_s / resume_s:+.1f}% with it"
    )
    if cold:
        print(
            f"cold page cache: torch.load {cold['cold_load_s']:.2f} s; verified load "
            f"{cold['cold_verify_then_load_s']:.2f} s ({100 * cold['cold_overhead']:+.1f}%)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
