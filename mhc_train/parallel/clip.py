"""Gradient clipping by the global norm, for every engine that holds gradients in pieces (tensor parallel, FSDP with
parameters it leaves whole, pipeline stages): one function, one all-reduce in all.

- Each rank adds the float64 squares of its local gradients (a DTensor's local shard, a plain tensor whole), each
  divided by how many ranks hold that same local gradient, so the world's sum counts every element once: one scalar
  all-reduce, whatever the mix of layouts (torch's `clip_grad_norm_` refuses DTensors on different meshes beside plain
  tensors).
- A gradient DTensor left `Partial` (or laid out otherwise than its parameter) is first redistributed like its
  parameter, as the optimizer would at its first use of it.
- The copies come from the gradient's placements by default: the ranks summed over divided by the product of the mesh
  dims it is sharded over (a plain tensor: whole on every one of them). A pipeline passes its own count (a gradient
  lives only on its stage's ranks).
- The clip factor min(1, limit / norm) is applied on the device: no host read of the norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from mhc_train.parallel.dist import DistInfo, all_reduce_sum_
from mhc_train.parallel.state import local


def placement_copies(grad: torch.Tensor, ranks: int) -> int:
    """How many of `ranks` ranks hold this rank's piece of `grad`: `ranks` over the number of pieces a DTensor is cut
    into (the sizes of the mesh dims it is not replicated over; laid out like its parameter, it is never `Partial`);
    `ranks` for a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(grad, DTensor):
        return ranks
    mesh = grad.device_mesh  # FSDP's dim under TP is a `_StridedShard`, which `is_shard()` does not count
    return ranks // math.prod(mesh.size(i) for i, pl in enumerate(grad.placements) if not pl.is_replicate())


def _placed_like_param(p: torch.Tensor) -> torch.Tensor:
    """`p.grad`, redistributed in place to `p`'s placements where they differ: DTensor leaves some gradients `Partial`
    over tp (the norms' `Replicate` gains under sequence parallelism), whose local pieces are not the gradient's
    elements. The optimizer would redistribute it at its first use anyway (pipeline: `match_grad_placements`)."""
    from torch.distributed.tensor import DTensor

    g = p.grad
    if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
        p.grad = g = g.redistribute(p.device_mesh, p.placements)
    return g


def clip_grads(params: Iterable[torch.Tensor], limit: float, info: DistInfo, device,
               copies: Callable[[torch.Tensor], int] | None = None) -> torch.Tensor:  # fmt: skip
    """The global pre-clip gradient norm over every rank and placement (a 0-dim float64 tensor on `device`, one
    all-reduce over the world), and every gradient scaled by min(1, limit / norm) on the device (limit 0: never).

    Args:
        params: the parameters with a gradient, on this rank.
        copies: how many ranks of the world hold the local gradient of a parameter whole (default:
            `placement_copies` of its gradient over the world).
    """
    copies = copies or (lambda p: placement_copies(p.grad, info.world))
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    grads = []
    for p in params:
        g = local(_placed_like_param(p).detach())  # a shard shares storage with its DTensor gradient: scaled below
        sq += g.double().square().sum() / copies(p)
        grads.append(g)
    all_reduce_sum_(sq, info)
    norm = sq.sqrt().reshape(())
    if limit > 0:
        scale = (limit / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm
