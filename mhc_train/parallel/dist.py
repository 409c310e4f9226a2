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
from datetime import timedelta

import torch
import torch.distributed as dist

from mhc_train.io.log import get_logger

logger = get_logger(__name__)


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


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group torchrun / the deepspeed launcher describe in the environment (no-op alone), and pick
    this rank's device (`train.device`; cuda:LOCAL_RANK on CUDA). `timeout_s` (`parallel.timeout_s`): how long a
    collective may wait for the slowest rank before the group aborts it."""
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
        dist.init_process_group(backend=process_group_backend(device_type), timeout=timedelta(seconds=timeout_s))
    return info


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def reduce_sum(value: torch.Tensor | float, info: DistInfo, device) -> torch.Tensor:
    """The sum of a scalar over all ranks (the value itself alone) as a 0-dim float64 tensor on `device`, without
    reading it on the host: on CUDA the all-reduce is queued on the stream and nothing waits for it here."""
    t = torch.as_tensor(value).detach().to(device=device, dtype=torch.float64).reshape(())
    if info.world > 1:
        t = t.clone() if isinstance(value, torch.Tensor) else t  # never reduce the caller's tensor in place
        dist.all_reduce(t)
    return t


def sum_across_ranks(value: torch.Tensor | float, info: DistInfo, device) -> float:
    """The sum of a scalar over all ranks (the value itself alone), reduced in float64 on `device`, read on the host."""
    return reduce_sum(value, info, device).item()


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over all ranks in place (on its own device; the tensor itself alone)."""
    if info.world > 1:
        dist.all_reduce(t)
    return t


def mean_over_mesh_(t: torch.Tensor, mesh) -> torch.Tensor:
    """Average `t` in place over every rank of the DeviceMesh `mesh` (each dimension in turn: HSDP's too)."""
    for dim in range(mesh.ndim):
        dist.all_reduce(t, group=mesh.get_group(dim))
    return t.div_(mesh.size())


def all_reduce_over(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """Reduce `t` in place over the ranks of `group` (`op`: sum or max): tensor parallelism's loss."""
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def sum_over_group(t: torch.Tensor, group) -> torch.Tensor:
    """A new tensor: the sum of `t` over the ranks of `group` (a gradient hook's; the caller's tensor untouched)."""
    out = t.clone()
    dist.all_reduce(out, group=group)
    return out


def send_to(t: torch.Tensor, peer: int, group=None) -> None:
    """Point-to-point send of `t` (on the compute device) to rank `peer` of `group` (the default group: None)."""
    dist.send(t.contiguous(), group=group, group_dst=peer)


def recv_from(shape, dtype, device, peer: int, group=None) -> torch.Tensor:
    """The tensor rank `peer` of `group` sends with `send_to`, received into a new one on `device`."""
    t = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(t, group=group, group_src=peer)
    return t


def gather_dicts(local: dict, info: DistInfo, group=None) -> dict:
    """Every rank's dict merged on rank 0 ({} elsewhere). A collective (on `group`, of every rank; default: the
    default group)."""
    if info.world == 1:
        return dict(local)
    gathered = [None] * info.world if info.is_main else None
    dist.gather_object(local, gathered, dst=0, group=group)
    return {k: v for part in gathered for k, v in part.items()} if info.is_main else {}


def shutdown() -> None:
    """After a successful distributed run: wait for every rank, then tear the process group down. Leaving it to
    interpreter exit can abort a rank ("terminate called without an active exception") while a backend thread is
    still alive, which turns a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_main(obj, info: DistInfo, group=None):
    """Rank 0's `obj` on every rank (picklable; the object itself alone). A collective (on `group`, of every rank;
    default: the default group)."""
    if info.world == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


_exchanges = itertools.count()  # every rank makes the same exchanges in the same order: equal tags


def exchange_without_deadline(value: str, info: DistInfo, report_s: float = 60.0) -> list[str]:
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
            logger.info(f"waiting for rank(s) {missing} ({last - t0:.0f} s so far)")
    return [store.get(k).decode() for k in keys]


def any_rank_flag(flag: bool, info: DistInfo) -> torch.Tensor:
    """1.0 on every rank when `flag` is set on any rank, else 0.0, as a 0-dim float64 tensor on the compute device
    that nobody has read yet (read it together with the step's other scalars: one host sync). A collective."""
    t = torch.tensor(1.0 if flag else 0.0, dtype=torch.float64, device=info.device)
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is set on any rank. A collective."""
    if info.world == 1:
        return flag
    return bool(any_rank_flag(flag, info).item())


def first_failure(error: str | None, info: DistInfo, group=None) -> tuple[int, str] | None:
    """(rank, error) of the lowest rank whose `error` is set, on every rank; None when no rank failed. A collective
    (of every rank on `group`): a rank that failed locally calls it too, so the others learn of the failure at once
    instead of waiting at their next collective until the group's timeout."""
    if info.world == 1:
        return (info.rank, error) if error is not None else None
    errors = [None] * info.world
    dist.all_gather_object(errors, error, group=group)
    return next(((r, e) for r, e in enumerate(errors) if e is not None), None)


def read_scalars(*values: torch.Tensor | float) -> list[float]:
    """The host values of device scalars in one transfer: one host sync however many there are (floats pass)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().reshape(()).to(tensors[0].device, torch.float64) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


# The all-to-alls of expert parallelism run synchronously unless an overlapped pipeline pair (overlap_ep.Interleave)
# installs a waiter: the exchange is then posted async and `waiter(work, tag)` decides when it is waited (after the
# other micro-batch's compute chunk has been issued).
_A2A_WAITER = None


def set_all_to_all_waiter(waiter):
    """Install `waiter(work, tag)` for the all-to-alls below (None: wait at once); returns the previous one."""
    global _A2A_WAITER
    previous, _A2A_WAITER = _A2A_WAITER, waiter
    return previous


def _exchange(out, x, out_splits, in_splits, group, tag: str):
    """`all_to_all_single` into `out`, waited at once or by the installed waiter (see `set_all_to_all_waiter`)."""
    waiter = _A2A_WAITER
    if waiter is None:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    else:
        getattr(waiter, "before_post", lambda: None)()  # raises once the other half has failed: post nothing more
        waiter(dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True), tag)
    return out


class _AllToAllUneven(torch.autograd.Function):
    """Rows of x to the ranks of `group` (in_splits rows to each, in rank order), out_splits rows from each; backward
    is the reverse exchange (tagged `<tag>_bwd`)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, tag):
        ctx.splits, ctx.group, ctx.tag = (out_splits, in_splits), group, tag
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        return _exchange(out, x.contiguous(), out_splits, in_splits, group, tag)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        _exchange(gx, g.contiguous(), in_splits, out_splits, ctx.group, f"{ctx.tag}_bwd")
        return gx, None, None, None, None


def all_to_all_uneven(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, tag: str = "all_to_all"
) -> torch.Tensor:
    """Expert parallelism's exchange (gloo and NCCL take uneven splits): `in_splits[r]` rows of x [M, ...] go to rank
    r of `group`, `out_splits[r]` rows come from it, concatenated in rank order; differentiable. `tag` names it in
    an overlapped pair's trace."""
    return _AllToAllUneven.apply(x, out_splits, in_splits, group, tag)


def all_to_all_equal(x: torch.Tensor, group=None, tag: str = "counts") -> torch.Tensor:
    """Row r of x [world, ...] to rank r of `group`; returns the rows received, row s from rank s (not
    differentiable: expert parallelism's token counts)."""
    return _exchange(torch.empty_like(x), x.contiguous(), None, None, group, tag)
