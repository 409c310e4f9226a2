"""Tensor + sequence parallelism on CPU: per-rank saved activation bytes and step time at tp = 1 and tp = 2, and the
collectives per step of the residual baseline vs mHC (the connection sites add none). Writes JSON under
benchmarks/results/. Run under torchrun (gloo on CPU; NCCL on GPUs with --device cuda):

    torchrun --nproc_per_node=2 scripts/bench_tp.py                      # benchmarks/results/tp_cpu.json
    torchrun --nproc_per_node=2 scripts/bench_tp.py --dim 256 --seq 512 --out benchmarks/results/tp_big.json

tp = 1 is the plain model on each rank (the same work as one process); tp = 2 its `apply_tp` copy over both ranks.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from mhc_train.config import ConnectionConfig, ModelConfig  # noqa: E402
from mhc_train.model.transformer import build_model  # noqa: E402
from mhc_train.parallel.tensor_parallel import apply_tp, sum_site_grads  # noqa: E402


def saved_bytes(model, x, y) -> int:
    """Bytes of the tensors autograd saves for backward in one forward, parameters excepted (each save counted; a
    DTensor by its local shard)."""
    total = 0

    def pack(t):
        nonlocal total
        t_local = getattr(t, "_local_tensor", t)
        if not isinstance(t, torch.nn.Parameter):
            total += t_local.numel() * t_local.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y).backward()
    model.zero_grad(set_to_none=True)
    return total


def step_time(model, x, y, mesh, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        model(x, y).backward()
        if mesh is not None:
            sum_site_grads(model, mesh)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2]  # the median, after one warm-up


def collectives(model, x, y, mesh) -> dict:
    with CommDebugMode() as comm:
        model(x, y).backward()
        sum_site_grads(model, mesh)
    model.zero_grad(set_to_none=True)
    return {str(k): v for k, v in comm.get_comm_counts().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tp_cpu.json"))
    args = p.parse_args()
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    cfg = ModelConfig(vocab_size=1024, dim=args.dim, n_layer=args.layers, n_head=8, max_seq_len=args.seq)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g) for _ in range(2))
    results = {"shape": vars(args), "tp": tp, "arms": {}}
    for arm in ("residual", "mhc"):
        conn = ConnectionConfig(type=arm, n_streams=1 if arm == "residual" else 4, backend="torch")
        plain = build_model(cfg, conn, seed=0)
        tp_model = apply_tp(copy.deepcopy(plain), mesh)
        results["arms"][arm] = {
            "saved_bytes_per_rank": {"tp1": saved_bytes(plain, x, y), f"tp{tp}": saved_bytes(tp_model, x, y)},
            "step_s": {
                "tp1": step_time(plain, x, y, None, args.repeats),
                f"tp{tp}": step_time(tp_model, x, y, mesh, args.repeats),
            },
            "collectives_per_step": collectives(tp_model, x, y, mesh),
            # per layer, forward + backward: two sub-layers, each an all-gather and a reduce-scatter of [B, T, C]
            # in each direction; the sites add nothing (their gradients: one all-reduce per step, not per layer)
            "sp_bytes_per_layer": 8 * args.batch * args.seq * args.dim * 4 * (tp - 1) // tp,
        }
    if dist.get_rank() == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
