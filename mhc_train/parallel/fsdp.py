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
2. Built from the meta device (`build.builds_on_meta`): the skeleton is sharded while it holds no storage, then
   `state.materialise` allocates this rank's shards on the device and fills them from the seed (each module's
   values drawn on the host, one module at a time, the shard sliced out locally) or from a file checkpoint's
   weights. No rank ever holds the whole model on the device, nor a second copy anywhere: the FSDP units' sharded
   parameters are the only storage. Every rank evaluates its slice of the val batches on the sharded model, and runs
   the diagnostics' batch through it (`Engine.site_statistics`); rank 0's plain view stays on `meta` until a file
   checkpoint or an export needs it whole (`Engine.full_model` gathers one tensor at a time into host memory). A model handed over already built (a caller's own) is copied,
   sharded, and the other ranks free theirs.
   Checkpoints (DCP by default, or one file) are keyed by parameter name: they load into one process, DDP, any
   pipeline layout, or FSDP at another world size.
3. Mixed precision (train.precision=bf16) where each block is its own unit: the blocks and the root are gathered
   in bf16 (half the all-gather traffic, bf16 GEMM weights) and their gradients reduce-scattered in fp32, while
   every connection site with parameters is a unit of its own gathered in fp32, so the coefficient path (phi,
   gates, biases) never sees a rounded weight. Inputs are never cast (`cast_forward_inputs=False`): the stream
   keeps model.stream_dtype. Where the whole module is one unit (recompute, split-backward schedules; note 1) the
   gathers stay fp32, since a module-wide bf16 cast would round phi; autocast still runs the GEMMs in bf16.
"""

from __future__ import annotations

import copy

import torch

from mhc_train.parallel.engine import LocalEngine, materialise_on_host, release_eval_copy
from mhc_train.parallel.state import full, full_model_state, local, materialise, on_meta


def shard(
    module: torch.nn.Module, mesh, per_block: bool = False, compute_dtype=None, reshard_after_forward: bool = True
) -> torch.nn.Module:
    """FSDP2 over `mesh`: with `per_block`, one unit per block (weights gathered just in time, freed after) plus the
    root; otherwise one unit for the whole module. Per-block needs the blocks' own forward to run (the plain block
    loop, no recompute runner) and a schedule without a split backward (see note 1). `compute_dtype` (bf16 under
    train.precision=bf16, else None): mixed precision for per-block units (note 3). `reshard_after_forward=False`
    keeps the units gathered from forward to backward (the pipeline's choice: no second all-gather per micro-batch)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from mhc_train.model.connections import Site

    if not (per_block and module.block_runner is None):
        return fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    low = (
        fp32 if compute_dtype is None else MixedPrecisionPolicy(compute_dtype, torch.float32, cast_forward_inputs=False)
    )
    for layer in module.layers.values():
        if compute_dtype is not None:
            for site in layer.modules():
                if isinstance(site, Site) and next(site.parameters(), None) is not None:
                    fully_shard(site, mesh=mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=mesh, mp_policy=low, reshard_after_forward=reshard_after_forward)
    return fully_shard(module, mesh=mesh, mp_policy=low)


class FSDPEngine(LocalEngine):
    """FSDP2 over all ranks, no pipeline. Trains a sharded copy; `self.model` stays plain for rank 0's evaluation."""

    name = "fsdp"
    checkpoint_formats = ("dcp", "file")

    def __init__(self, model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype,
                 grad_accum: int, compile: bool = False, seed: int = 0, weights: dict | None = None,
                 mesh=None):  # fmt: skip
        mesh = mesh.dp_mesh()  # a `mesh.ParallelMesh`: FSDP2 over dp_shard, HSDP over (dp_replicate, dp_shard)
        built_on_meta = on_meta(model)
        # a copy of a meta skeleton is free
        self.train_model = shard(copy.deepcopy(model), mesh, per_block=True, compute_dtype=autocast_dtype)
        if built_on_meta:
            materialise(self.train_model, device, seed, weights)  # this rank's shards only (note 2)
        else:
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

    def clip(self) -> torch.Tensor:
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return full(torch.nn.utils.clip_grad_norm_(self.params_with_grad(), limit))

    def param_names(self) -> dict:
        return {p: n for n, p in self.train_model.named_parameters()}

    def local_named_grads(self):
        return None  # sharded

    def eval_forward(self):
        return self.train_model

    def evaluate(self, batches) -> float:
        try:
            return super().evaluate(batches)
        finally:
            reshard_all([self.train_model])

    def diag_modules(self):
        return self.train_model, self.train_model  # not the compiled forward: the probe's hooks need eager sites

    def after_diag(self) -> None:
        reshard_all([self.train_model])

    def _sync_full_model(self) -> None:
        state = full_model_state([self.train_model], keep=self.dist.is_main)
        if self.dist.is_main:
            materialise_on_host(self.model, state)

    def gather_grads(self) -> dict:
        return {n: full(p.grad).detach().cpu().clone() for p, n in self.param_names().items() if p.grad is not None}

    def live_modules(self):
        return [self.train_model]


def reshard_all(modules) -> None:
    """A forward without backward leaves the root unit's parameters unsharded (the module then holds other tensors
    than the ones the optimizer steps): reshard every FSDP unit of `modules` after one (no-op without FSDP)."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
