"""DualPipeV with our OVERLAP_F_B against torch's in-order handler and 1F1B, on ONE device.

    .venv/bin/python scripts/bench_overlap.py                                    # CPU smoke run (test model)
    python scripts/bench_overlap.py --model 125m --seq 2048 --micro-batch 2 --microbatches 8 --steps 10   # a GPU

With one rank, DualPipeV still holds two stages (the V folds onto itself) and emits OVERLAP_F_B actions, so the
forward of one micro-batch and the backward of another can overlap on a single GPU: this measures exactly what our
handler adds, without the network. Variants: `dualpipev` + our overlap, `dualpipev` + torch's handler (in order),
and `1f1b` (one stage). Per variant: step time, tokens/s, the loss and gradient norm of the first step (the three
must agree), and on CUDA the kernel time during which two or more streams ran at once (torch.profiler), i.e. the
overlap actually achieved. Writes benchmarks/results/bench_overlap_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _concurrent_ms(events) -> float:
    """Total time during which kernels of at least two different CUDA streams were running (profiler events)."""
    edges = []
    for e in events:
        stream = getattr(e, "stream", None)  # FunctionEventAvg lacks it; raw kernel events carry it
        if e.device_type == torch.autograd.DeviceType.CUDA and stream is not None:
            edges += [(e.time_range.start, 1, stream), (e.time_range.end, -1, stream)]
    active: dict[int, int] = {}
    busy, last = 0.0, None
    for t, d, s in sorted(edges, key=lambda x: (x[0], x[1])):
        if last is not None and sum(1 for v in active.values() if v > 0) >= 2:
            busy += t - last
        active[s] = active.get(s, 0) + d
        last = t
    return busy / 1000.0  # us -> ms


def run_variant(cfg, schedule: str, overlap: bool, args, device) -> dict:
    import dataclasses

    from mhc_train.model import build_model
    from mhc_train.parallel import DistInfo
    from mhc_train.parallel.build import build_pipeline

    model = build_model(cfg.model, cfg.connection, seed=0, device=device)
    parallel = dataclasses.replace(
        cfg.parallel, pp_schedule=schedule, pp_microbatches=args.microbatches, recompute=args.recompute,
        recompute_block="auto", pp_overlap=overlap,
    )  # fmt: skip
    train = dataclasses.replace(cfg.train, max_steps=1000)
    optim = dataclasses.replace(cfg.optim, grad_clip=1.0)
    run_cfg = dataclasses.replace(cfg, parallel=parallel, train=train, optim=optim)
    engine = build_pipeline(model, run_cfg, DistInfo(device=device), pp=1)
    g = torch.Generator().manual_seed(0)
    batch = args.micro_batch * args.microbatches
    x = torch.randint(0, cfg.model.vocab_size, (batch, args.seq), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (batch, args.seq), generator=g)

    def step():
        loss = engine.forward_backward(lambda micro, shard, n_shards: (x, y))
        norm = engine.clip()
        engine.optimizer.zero_grad(set_to_none=True)  # timing only: weights stay fixed, every step is the same work
        return loss, norm

    first_loss, first_norm = (float(v) for v in step())  # device scalars (the engine contract), read once
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {
        "schedule": schedule,
        "our_overlap": overlap,
        "step_ms": dt * 1e3,
        "tokens_per_s": batch * args.seq / dt,
        "first_loss": first_loss,
        "first_grad_norm": first_norm,
        "overlap_pairs_per_step": engine.overlap.pairs / (args.steps + args.warmup + 1) if engine.overlap else 0,
        "stream_trace": engine.overlap.trace
        if engine.overlap
        else [],  # (pair, F stage, mb, stream, B stage, mb, stream)
    }
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        out["concurrent_kernel_ms_per_step"] = _concurrent_ms(prof.events())
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="test", help="a configs/model preset")
    p.add_argument("--connection", default="mhc")
    p.add_argument("--layers", type=int, default=0, help="override model.n_layer (must be even)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recompute", default="none", choices=["none", "mhc", "full"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="")
    args = p.parse_args()

    from mhc_train.config import load_config

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    overrides = [f"model={args.model}", f"connection={args.connection}", f"train.seq_len={args.seq}"]
    overrides.append(f"model.max_seq_len={max(args.seq, 64)}")
    if args.layers:
        overrides.append(f"model.n_layer={args.layers}")
    cfg = load_config(overrides)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    results = [
        run_variant(cfg, "dualpipev", True, args, device),
        run_variant(cfg, "dualpipev", False, args, device),
        run_variant(cfg, "1f1b", False, args, device),
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": name,
        "torch": torch.__version__,
        "model": args.model,
        "connection": args.connection,
        "n_layer": cfg.model.n_layer,
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "microbatches": args.microbatches,
        "recompute": args.recompute,
        "results": results,
    }
    for r in results:
        extra = (
            f", concurrent kernels {r['concurrent_kernel_ms_per_step']:.2f} ms"
            if "concurrent_kernel_ms_per_step" in r
            else ""
        )
        print(
            f"{r['schedule']:>9} overlap={str(r['our_overlap']):5}: {r['step_ms']:8.1f} ms/step, "
            f"{r['tokens_per_s']:10,.0f} tok/s, first loss {r['first_loss']:.6f}, grad norm {r['first_grad_norm']:.6f}, "
            f"{r['overlap_pairs_per_step']:.0f} overlapped pairs/step{extra}"
        )
    out = Path(args.out or f"benchmarks/results/bench_overlap_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
