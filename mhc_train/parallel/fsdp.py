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
2. Every rank evaluates its slice of the val batches on the sharded model. Rank 0 keeps a plain copy for
   diagnostics and file checkpoints (`Engine.full_model` gathers one tensor at a time into it); the other ranks free
   theirs (meta device) once the engine has its training copy. Not yet built from the meta device (DeepSpeed is:
   data_parallel.py): a first try failed because an evaluation forward left the root unit unsharded (fixed in
   `evaluate`); re-enabling it with `state.materialise` is the next step.
   Checkpoints (DCP by default, or one file) are keyed by parameter name: they load into one process, DDP, any
   pipeline layout, or FSDP at another world size.
"""

from __future__ import annotations

import copy

import torch

from mhc_train.parallel.engine import LocalEngine, release_eval_copy
from mhc_train.parallel.state import full, full_model_state, local


def shard(module: torch.nn.Module, mesh, per_block: bool = False) -> torch.nn.Module:
    """FSDP2 over `mesh`: with `per_block`, one unit per block (weights gathered just in time, freed after) plus the
    root; otherwise one unit for the whole module. Per-block needs the blocks' own forward to run (the plain block
    loop, no recompute runner) and a schedule without a split backward (see note 1)."""
    from torch.distributed.fsdp import fully_shard

    if per_block and module.block_runner is None:
        for layer in module.layers.values():
            fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


class FSDPEngine(LocalEngine):
    """FSDP2 over all ranks, no pipeline. Trains a sharded copy; `self.model` stays plain for rank 0's evaluation."""

    name = "fsdp"
    checkpoint_formats = ("dcp", "file")

    def __init__(self, model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype,
                 grad_accum: int, compile: bool = False):  # fmt: skip
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(torch.device(device).type, (dist.world,), mesh_dim_names=("dp",))
        self.train_model = shard(copy.deepcopy(model), mesh, per_block=True)
        release_eval_copy(model, dist)
        optimizer = build_optimizer(self.train_model)
        super().__init__(model, optimizer, build_scheduler(optimizer), dist, device, grad_clip, autocast_dtype,
                         grad_accum)  # fmt: skip
        self.forward = torch.compile(self.train_model) if compile else self.train_model

    def describe(self) -> str:
        held = sum(local(p).numel() for p in self.train_model.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return f"fsdp: {self.dist.world} ranks; rank {self.dist.rank} holds {held:,} of {total:,} parameter elements"

    def train_parameters(self):
        return self.train_model.parameters()

    def backward(self, loss, micro: int) -> None:
        """Reduce-scatter the gradients once per step, in the last micro-batch (FSDP2 accumulates unsharded
        gradients locally before it)."""
        self.train_model.set_requires_gradient_sync(micro == self.grad_accum - 1)
        (loss / self.grad_accum).backward()

    def clip(self) -> float:
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return full(torch.nn.utils.clip_grad_norm_(self.params_with_grad(), limit)).item()

    def param_names(self) -> dict:
        return {p: n for n, p in self.train_model.named_parameters()}

    def local_named_grads(self):
        return None  # sharded

    def eval_forward(self):
        return self.train_model

    def evaluate(self, batches) -> float:
        """A forward without backward leaves the root unit's parameters unsharded (the module then holds other
        tensors than the ones the optimizer steps): reshard every unit after it."""
        from torch.distributed.fsdp import FSDPModule

        try:
            return super().evaluate(batches)
        finally:
            for m in self.train_model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def _sync_full_model(self) -> None:
        state = full_model_state([self.train_model], keep=self.dist.is_main)
        if self.dist.is_main:
            self.model.load_state_dict(state)

    def gather_grads(self) -> dict:
        return {n: full(p.grad).detach().cpu().clone() for p, n in self.param_names().items() if p.grad is not None}

    def live_modules(self):
        return [self.train_model]
