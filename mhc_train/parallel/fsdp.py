"""FSDP2 (`torch.distributed.fsdp.fully_shard`) data parallelism, alone or per pipeline stage.

- Alone (`parallel.engine=fsdp`, `pp=1`): the training copy of the model is sharded over all ranks; parameters,
  gradients and optimizer states live as DTensor shards (ZeRO-3 layout), gathered for each forward and backward.
- With a pipeline (`pp>1`): the launched ranks form a (pp, dp) device mesh; each stage module is sharded over its
  dp group and torch.distributed.pipelining drives FSDP itself (no gradient sync until the last micro-batch, then
  a reduce-scatter; UNSHARD / RESHARD actions in the multi-stage schedules).

Notes:
1. FSDP alone, or under 1F1B / interleaved 1F1B, without recompute: each block is its own FSDP unit (weights
   gathered just before the block, freed after), plus the root for the embedding, final norm and head. Otherwise a
   stage or model is one unit: the recompute runner calls the sites directly rather than the blocks' `forward`,
   where FSDP's per-module hooks live, and under the split-backward schedules (ZBV, DualPipeV) nested units gave
   wrong gradients in our test (torch 2.13) while one unit per stage matches one process.
2. Rank 0 evaluates, runs diagnostics and writes file-format checkpoints on a plain, unsharded copy of the model
   (`sync_full_model` gathers full weights into it); the other ranks free theirs (meta device) once the engine has
   its training copy. Checkpoints (DCP by default, or one file) are keyed by parameter name: they load into one
   process, DDP, any pipeline layout, or FSDP at another world size.
"""

from __future__ import annotations

import copy

import torch

from mhc_train.parallel.data_parallel import TorchEngine


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, _dtensor_cls()) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers a DTensor over its mesh (a collective: every rank of the mesh must call it)."""
    return t.full_tensor() if isinstance(t, _dtensor_cls()) else t


def shard_like(value, param: torch.Tensor):
    """A full tensor laid out like `param` (a DTensor shard of it when `param` is one); other values unchanged."""
    if isinstance(param, _dtensor_cls()) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value


def release_eval_copy(model: torch.nn.Module, info) -> None:
    """Only rank 0 evaluates and writes checkpoint files from the plain model; once an engine trains its own copy,
    the other ranks move theirs to the meta device (shapes kept, storage freed: one whole model per rank)."""
    if not info.is_main:
        model.to(torch.device("meta"))


def shard(module: torch.nn.Module, mesh, per_block: bool = False) -> torch.nn.Module:
    """FSDP2 over `mesh`: with `per_block`, one unit per block (weights gathered just in time, freed after) plus the
    root; otherwise one unit for the whole module. Per-block needs the blocks' own forward to run (no recompute
    runner) and a schedule without a split backward (see note 1)."""
    from torch.distributed.fsdp import fully_shard

    if per_block and getattr(module, "layer_runner", None) is None:
        for layer in module.layers.values():
            fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def full_state(modules) -> dict:
    """{parameter/buffer name: full CPU tensor} over `modules` (a collective under FSDP)."""
    return {k: full(v).detach().cpu() for m in modules for k, v in m.state_dict().items()}


def full_optimizer_state(optimizer, names: dict) -> dict:
    """By-name optimizer state with every DTensor gathered (a collective under FSDP)."""
    from mhc_train.train.checkpoint import optimizer_state_by_name

    state = optimizer_state_by_name(optimizer, names)
    state["state"] = {
        name: {k: full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for name, entry in state["state"].items()
    }
    return state


def load_full_optimizer_state(optimizer, saved: dict, names: dict) -> None:
    from mhc_train.train.checkpoint import load_optimizer_state_by_name

    load_optimizer_state_by_name(optimizer, saved, names, convert=shard_like)


class FSDPEngine(TorchEngine):
    """FSDP2 over all ranks, no pipeline. Trains a sharded copy; `self.model` stays plain for rank 0's evaluation."""

    name = "fsdp"

    def __init__(self, model, build_optimizer, build_scheduler, grad_clip: float, info, device):
        from torch.distributed.device_mesh import init_device_mesh

        self.model, self.grad_clip, self.info = model, grad_clip, info
        mesh = init_device_mesh(device.type, (info.world,), mesh_dim_names=("dp",))
        self.train_model = shard(copy.deepcopy(model), mesh, per_block=True)
        release_eval_copy(model, info)
        self.optimizer = build_optimizer(self.train_model)
        self.scheduler = build_scheduler(self.optimizer)
        self.forward = self.train_model

    def describe(self) -> str:
        held = sum(local(p).numel() for p in self.train_model.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return f"fsdp: {self.info.world} ranks; rank {self.info.rank} holds {held:,} of {total:,} parameter elements"

    def clip(self) -> float:
        params = [p for p in self.train_model.parameters() if p.grad is not None]
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return full(torch.nn.utils.clip_grad_norm_(params, limit)).item()

    def _names(self) -> dict:
        return {p: n for n, p in self.train_model.named_parameters()}

    def sync_full_model(self) -> None:
        state = full_state([self.train_model])
        if self.info.is_main:
            self.model.load_state_dict(state)

    def gather_grads(self) -> dict:
        return {
            n: full(p.grad).detach().cpu().clone() for n, p in self.train_model.named_parameters() if p.grad is not None
        }

    def dcp_state(self) -> dict:
        from mhc_train.train.checkpoint import dcp_state

        return dcp_state([self.train_model], self.optimizer, self._names())

    def state_dict(self) -> dict:
        return {
            "optimizer": full_optimizer_state(self.optimizer, self._names()),
            "scheduler": self.scheduler.state_dict(),
        }
