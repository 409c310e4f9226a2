"""The process group: who this rank is, joining the group torchrun describes, and every collective the trainer, the
checkpoints and the engines issue themselves (the rest are inside torch's DDP / FSDP / pipelining and DeepSpeed).

- On CUDA the default group serves both devices, `cuda:nccl,cpu:gloo`: a CPU tensor that reaches a collective goes
  through gloo instead of failing under NCCL. The helpers here still put their tensors on the compute device.
- Reductions are in float64 on that device and return Python numbers.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's compute device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_backend(device_type: str) -> str:
    """`cuda:nccl,cpu:gloo` on CUDA (both devices served), gloo on CPU."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"


def resolve_device_type(device: str) -> str:
    """`train.device`: auto is cuda where available, cpu otherwise."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun / the deepspeed launcher describe in the environment (no-op alone), and pick
    this rank's device (`train.device`; cuda:LOCAL_RANK on CUDA)."""
    device_type = resolve_device_type(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    dev = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if world == 1:
        return DistInfo(device=dev)
    info = DistInfo(int(os.environ["RANK"]), world, local_rank, dev)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=process_group_backend(device_type))
    return info


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def sum_across_ranks(value: torch.Tensor | float, info: DistInfo, device) -> float:
    """The sum of a scalar over all ranks (the value itself alone), reduced in float64 on `device`."""
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(device)
    if info.world > 1:
        dist.all_reduce(t)
    return t.item()


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over all ranks in place (on its own device; the tensor itself alone)."""
    if info.world > 1:
        dist.all_reduce(t)
    return t


def gather_dicts(local: dict, info: DistInfo) -> dict:
    """Every rank's dict merged on rank 0 ({} elsewhere). A collective."""
    if info.world == 1:
        return dict(local)
    gathered = [None] * info.world if info.is_main else None
    dist.gather_object(local, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if info.is_main else {}


def shutdown() -> None:
    """After a successful distributed run: wait for every rank, then tear the process group down. Leaving it to
    interpreter exit can abort a rank ("terminate called without an active exception") while a backend thread is
    still alive, which turns a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_main(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (picklable; the object itself alone). A collective."""
    if info.world == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_exchanges = itertools.count()  # every rank makes the same exchanges in the same order: equal tags


def exchange_without_deadline(value: str, info: DistInfo, log=lambda *a: None, report_s: float = 60.0) -> list[str]:
    """Every rank's string `value`, in rank order, through the process group's key-value store. Unlike a collective
    this has no timeout: a rank waits (polling, and logging every `report_s`) for as long as the slowest rank takes,
    e.g. one still preparing data for hours."""
    if info.world == 1:
        return [value]
    store = dist.distributed_c10d._get_default_store()
    tag = f"mhc_exchange/{next(_exchanges)}"
    store.set(f"{tag}/{info.rank}", value)
    keys = [f"{tag}/{r}" for r in range(info.world)]
    t0 = last = time.monotonic()
    while not store.check(keys):
        time.sleep(0.2)
        if time.monotonic() - last >= report_s:
            last = time.monotonic()
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            log(f"waiting for rank(s) {missing} ({last - t0:.0f} s so far)")
    return [store.get(k).decode() for k in keys]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is set on any rank. A collective."""
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
