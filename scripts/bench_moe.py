"""The MoE FFN's cost: the layer against a dense reference, and expert parallelism's step time and all-to-all volume.

    .venv/bin/python scripts/bench_moe.py                 # CPU: ~1 minute, writes benchmarks/results/bench_moe_cpu.json
    python scripts/bench_moe.py --tokens 16384 --dim 1280 --hidden 896 --experts 64 --top-k 6 --no-ep   # a GPU

1. Layer (forward + backward, one process): the MoE FFN with its grouped matmul, the same with the per-expert loop,
   and the dense reference of equal active width (one SwiGLU of (top_k + shared) x hidden: the FLOPs a token
   spends); tokens/s of each.
2. Grouped GEMM (the routed experts alone, forward + backward): `torch._grouped_mm` (`experts_grouped`) against the
   per-expert loop (`experts_loop`), rows balanced over the experts; tokens/s (tokens of top_k rows each) and TFLOPS.
   On CPU at the layer's small shapes in fp32; on CUDA in bf16 at the mHC paper's expert shapes (Table 5: C x H, E
   experts, top-6, 3B / 9B / 27B) at --grouped-tokens tokens; --grouped-shapes C:H:E:k,... overrides either.
3. Expert parallelism (CPU, gloo; skipped with --no-ep): a training step of `--model` on one process against
   `parallel=ep` on 2 ranks (torchrun of this file), the same global batch; and the bytes each rank hands to
   all-to-all per step (dispatch + combine, forward + backward, counted on the calls).
3. `--overlap` (2 CUDA GPUs; elsewhere it says so and records nothing): DualPipeV folded onto each of 2 ranks x
   ep = 2, step time with each overlapped pair's halves interleaved at their all-to-alls (parallel/overlap_ep.py)
   against the same pairs in order, and the in-order run's exchange time (CUDA events around each exchange): the
   fraction of all-to-all time hidden = (in order - interleaved) / exchange time, clipped to [0, 1].

    python scripts/bench_moe.py --no-ep --overlap --model moe_demo --seq 512     # on a 2-GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
PAPER_EXPERTS = "1280:896:64:6,1920:1280:64:6,2560:1536:72:6"  # Table 5's C:H:E:k of the 3B, 9B, 27B models


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def bench_layer(args, device) -> dict:
    from mhc_train.config import MoEConfig
    from mhc_train.model.layers import FeedForward
    from mhc_train.model.moe import MoE

    cfg = MoEConfig(n_routed_experts=args.experts, top_k=args.top_k, n_shared_experts=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # grouped_mm on CUDA: bf16
    moe = MoE(args.dim, cfg, args.hidden).to(device)
    dense = FeedForward(args.dim, (args.top_k + 1) * args.hidden).to(device, dtype)
    for p in [*moe.parameters(), *dense.parameters()]:
        torch.nn.init.normal_(p, std=0.02)
    moe.gate.to(dtype), moe.shared.to(dtype), moe.experts.to(dtype)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)

    def step(module):
        return lambda: module(x).sum().backward()

    out = {}
    for name, module, grouped in (("moe_grouped", moe, True), ("moe_loop", moe, False), ("dense_ref", dense, None)):
        if grouped is not None:
            moe.experts.grouped = grouped
        s = _time(step(module), args.reps)
        out[name] = {"ms": 1e3 * s, "tokens_per_s": args.tokens / s}
    out["moe_grouped_over_dense"] = out["moe_grouped"]["ms"] / out["dense_ref"]["ms"]
    return out


def bench_grouped(shape: str, tokens: int, device, reps: int) -> dict:
    """The experts of one MoE layer of `shape` (C:H:E:k) over `tokens` tokens (tokens x k rows, balanced), forward +
    backward with random upstream gradients: grouped_mm vs the per-expert loop."""
    from mhc_train.model.moe import experts_grouped, experts_loop, grouped_ok

    dim, hidden, experts, top_k = (int(v) for v in shape.split(":"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # grouped_mm on CUDA: bf16
    rows = tokens * top_k
    counts = torch.full((experts,), rows // experts, device=device)
    counts[: rows % experts] += 1
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, std=1.0):
        return (torch.randn(*size, generator=g, device=device) * std).to(dtype).requires_grad_()

    x, gy = randn(rows, dim), randn(rows, dim).detach()
    w1, w3, w2 = (
        randn(experts, dim, hidden, std=0.02),
        randn(experts, dim, hidden, std=0.02),
        randn(experts, hidden, dim, std=0.02),
    )
    flops = 3 * 6 * rows * dim * hidden  # three matmuls of 2 x rows x C x H, the backward twice the forward
    out = {"shape": {"dim": dim, "hidden": hidden, "experts": experts, "top_k": top_k, "tokens": tokens},
           "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    fns = {"loop": experts_loop}
    if grouped_ok(dim, hidden, dtype=dtype):
        fns["grouped_mm"] = experts_grouped
    for name, fn in fns.items():
        s = _time(lambda fn=fn: fn(x, w1, w3, w2, counts).backward(gy), reps)
        out[name] = {"ms": 1e3 * s, "tokens_per_s": tokens / s, "tflops": flops / s / 1e12}
    if "grouped_mm" in out:
        out["grouped_over_loop_speedup"] = out["loop"]["ms"] / out["grouped_mm"]["ms"]
    return out


def _versions(device) -> dict:
    """The device and the versions the numbers were measured with."""
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda}  # fmt: skip
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _ep_overrides(args, ep: int) -> list[str]:
    over = [f"model={args.model}", "train=test", "train.precision=fp32", "train.device=cpu", "logging.wandb=false",
            f"train.batch_size={args.batch}", f"train.seq_len={args.seq}", "train.threads=1"]  # fmt: skip
    return over + (["parallel=ep", f"parallel.ep={ep}"] if ep > 1 else [])


def step_times(args, ep: int, dist) -> tuple[float, int]:
    """(seconds per training step after the first, all-to-all bytes this rank sent per step)."""
    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine

    cfg = load_config(_ep_overrides(args, ep))
    model = build_model(cfg.model, cfg.connection, device="meta" if ep > 1 else "cpu")
    engine = build_engine(model, cfg, dist)
    sent = [0]
    real = torch.distributed.all_to_all_single

    def counting(output, input, *a, **kw):
        sent[0] += input.numel() * input.element_size()
        return real(output, input, *a, **kw)

    torch.distributed.all_to_all_single = counting
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator())

    def batch(micro, shard, n_shards):
        per = args.batch // n_shards
        rows = tokens[shard * per : (shard + 1) * per]
        return rows[:, :-1], rows[:, 1:]

    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        engine.forward_backward(batch)
        engine.step()
        times.append(time.perf_counter() - t0)
    torch.distributed.all_to_all_single = real
    return sum(times[1:]) / (STEPS - 1), sent[0] // STEPS


def ep_worker(args) -> None:
    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import shutdown

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    seconds, sent = step_times(args, 2, dist)
    if dist.is_main:
        print("EP_RESULT " + json.dumps({"step_s": seconds, "all_to_all_bytes_per_rank_per_step": sent}), flush=True)
    shutdown()


def bench_ep(args) -> dict:
    from mhc_train.parallel.dist import DistInfo

    torch.set_num_threads(1)
    one, _ = step_times(args, 1, DistInfo())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29813",
           str(Path(__file__).resolve()), "--ep-worker", *sys.argv[1:]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("EP_RESULT ")), None)
    if line is None:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    ep = json.loads(line.removeprefix("EP_RESULT "))
    return {"model": args.model, "batch": args.batch, "seq": args.seq, "one_process_step_s": one,
            "ep2_step_s": ep["step_s"], "ep2_over_one": ep["step_s"] / one,
            "all_to_all_bytes_per_rank_per_step": ep["all_to_all_bytes_per_rank_per_step"]}  # fmt: skip


# ---- 3. the all-to-all hidden by DualPipeV's overlapped pairs (CUDA, >= 2 GPUs) --------------------------------
def _overlap_engine(args, dist, device):
    """DualPipeV folded onto each rank (pp=1: both V stages here, as scripts/bench_overlap.py) x FSDP x ep = 2 over
    the 2 ranks: every OVERLAP_F_B pair has MoE layers on both halves."""
    import dataclasses

    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.parallel.build import build_pipeline
    from mhc_train.parallel.mesh import ParallelMesh

    cfg = load_config([f"model={args.model}", "train=test", "logging.wandb=false", f"train.seq_len={args.seq}",
                       f"model.max_seq_len={max(args.seq, 64)}", "model.n_layer=4"])  # fmt: skip
    parallel = dataclasses.replace(cfg.parallel, engine="fsdp", ep=2, pp_schedule="dualpipev", pp_overlap=True,
                                   pp_microbatches=args.microbatches, recompute="mhc", recompute_block="auto")  # fmt: skip
    train = dataclasses.replace(cfg.train, precision="bf16" if device.type == "cuda" else "fp32", max_steps=1000)
    cfg = dataclasses.replace(cfg, parallel=parallel, train=train)
    model = build_model(cfg.model, cfg.connection, seed=0, device="meta")
    # each rank is a whole pipeline of its own (no point-to-point): its stages' group is the rank alone
    solo = [torch.distributed.new_group([r]) for r in range(dist.world)][dist.rank]
    ParallelMesh.pp_group = lambda self: solo
    return build_pipeline(model, cfg, dist, pp=1), cfg


def _timed_all_to_all(device, spans: list):
    """`all_to_all_single` wrapped to time each synchronous exchange on the stream that consumes it (CUDA events;
    perf_counter on CPU)."""
    real = torch.distributed.all_to_all_single

    def timed(*a, **kw):
        if kw.get("async_op"):
            return real(*a, **kw)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = real(*a, **kw)
            end.record()
            spans.append((start, end))
        else:
            t0 = time.perf_counter()
            out = real(*a, **kw)
            spans.append(time.perf_counter() - t0)
        return out

    return real, timed


def overlap_worker(args) -> None:
    """Step time with the expert all-to-alls interleaved in the overlapped pairs (T_on) and without (T_off, the same
    pairs in order), and the time of the in-order run's exchanges (A); hidden fraction = (T_off - T_on) / A, clipped
    to [0, 1]. Rank 0 prints one OVERLAP_RESULT line."""
    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import shutdown

    dist = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dist.device)
    engine, cfg = _overlap_engine(args, dist, device)
    g = torch.Generator().manual_seed(0)
    n = args.micro_batch * args.microbatches * 2
    tokens = torch.randint(0, cfg.model.vocab_size, (n, args.seq + 1), generator=g)

    def step():
        engine.forward_backward(lambda m, shard, k: (tokens[shard::k, :-1], tokens[shard::k, 1:]))
        engine.optimizer.zero_grad(set_to_none=True)  # timing only: the same work every step

    def timed_steps(interleave: bool, spans=None) -> float:
        engine.overlap.interleave_a2a = interleave
        step()  # warm-up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        real, timed = _timed_all_to_all(device, spans) if spans is not None else (None, None)
        if timed is not None:
            torch.distributed.all_to_all_single = timed
        t0 = time.perf_counter()
        for _ in range(args.reps):
            step()
        sync()
        if real is not None:
            torch.distributed.all_to_all_single = real
        return (time.perf_counter() - t0) / args.reps

    spans: list = []
    t_off = timed_steps(False, spans)
    t_on = timed_steps(True)
    ms = [s.elapsed_time(e) / 1e3 for s, e in spans] if device.type == "cuda" else spans
    a2a = sum(ms) / args.reps
    hidden = min(max((t_off - t_on) / a2a, 0.0), 1.0) if a2a > 0 else 0.0
    if dist.is_main:
        result = {"step_s_in_order": t_off, "step_s_interleaved": t_on, "all_to_all_s_per_step": a2a,
                  "hidden_fraction": hidden, "device": device.type, "pairs": engine.overlap.pairs}  # fmt: skip
        print("OVERLAP_RESULT " + json.dumps(result), flush=True)
    shutdown()


def bench_overlap_hidden(args) -> dict | None:
    """The fraction of all-to-all time DualPipeV's interleaved pairs hide, on 2 GPUs (torchrun of this file); None
    (and a line saying why) where there is no GPU pair: a CPU number would say nothing about NCCL on streams."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("bench_moe --overlap: needs 2 CUDA GPUs (expert parallelism over 2 ranks, NCCL on streams); "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} here, nothing measured")  # fmt: skip
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29814",
           str(Path(__file__).resolve()), "--overlap-worker", *sys.argv[1:]]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("OVERLAP_RESULT ")), None)
    if line is None:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    return {"model": args.model, "seq": args.seq, "microbatches": args.microbatches,
            **json.loads(line.removeprefix("OVERLAP_RESULT "))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="moe_demo", help="configs/model/NAME.yaml for the EP step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--no-ep", action="store_true")
    ap.add_argument(
        "--grouped-shapes", default="", help=f"C:H:E:k,... (default: the layer's on CPU, {PAPER_EXPERTS} on CUDA)"
    )
    ap.add_argument(
        "--grouped-tokens",
        type=int,
        default=0,
        help="tokens per grouped-GEMM run (default: --tokens on CPU, 16384 on CUDA)",
    )
    ap.add_argument("--ep-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", action="store_true", help="also the all-to-all hidden by DualPipeV (2 GPUs)")
    ap.add_argument("--overlap-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--microbatches", type=int, default=8, help="--overlap: DualPipeV micro-batches per step")
    ap.add_argument("--micro-batch", type=int, default=2, help="--overlap: sequences per micro-batch and rank")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.ep_worker:
        return ep_worker(args)
    if args.overlap_worker:
        return overlap_worker(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {**_versions(device), "layer": {**vars(args), **bench_layer(args, device)}}
    cuda = device.type == "cuda"
    shapes = args.grouped_shapes or (PAPER_EXPERTS if cuda else f"{args.dim}:{args.hidden}:{args.experts}:{args.top_k}")
    tokens = args.grouped_tokens or (16384 if cuda else args.tokens)
    result["grouped_gemm"] = [bench_grouped(shape, tokens, device, args.reps) for shape in shapes.split(",")]
    if not args.no_ep:
        result["expert_parallel_cpu"] = bench_ep(args)
    if args.overlap:
        hidden = bench_overlap_hidden(args)
        if hidden is not None:
            result["dualpipev_all_to_all_hidden"] = hidden
    path = Path(args.out or REPO / f"benchmarks/results/bench_moe_{device.type}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
