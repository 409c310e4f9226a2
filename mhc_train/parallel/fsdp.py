"""FSDP2 (`torch.distributed.fsdp.fully_shard`) data parallelism, alone or per pipeline stage.

- Alone (`parallel.engine=fsdp`, `pp=1`): the training copy of the model is sharded over all ranks; parameters,
  gradients and optimizer states live as DTensor shards (ZeRO-3 layout), gathered for each forward and backward.
- With a pipeline (`pp>1`): the launched ranks form a (pp, dp) device mesh; each stage module is sharded over its
  dp group and torch.distributed.pipelining drives FSDP itself (no gradient sync until the last micro-batch, then
  a reduce-scatter; UNSHARD / RESHARD actions in the multi-stage schedules).

Notes:
1. Units follow the computation; the whole model is never one unit except where a schedule needs it.
   - No recompute (FSDP alone, or under 1F1B / interleaved 1F1B): each block is a unit (weights gathered just
     before the block, freed after), plus the root for the embedding, final norm and head.
   - Recompute `mhc` or `full` (same engines): each site's F module (`layer.attn`, `layer.ffn`: a `SitePart`'s
     `owner`) is a unit, plus the root. The recompute runner calls the sites and F directly, not `Block.forward`,
     but F's own forward runs normally (in the forward, and again in `full`'s recomputation), so FSDP's hooks fire
     there. The connection sites' and the blocks' norms' parameters (phi, gates, biases, gains: small) are left out
     of FSDP (`ignored_params`): fp32, whole on every rank, given to `_SitePre` as inputs as in one process, and
     their gradients averaged over the data-parallel mesh once per step (`sync_replicated_grads`, by the engine
     after its last backward; the clip counts them once). Under TP x FSDP the norms' gains left out are `Replicate`
     DTensors over ("tp",) (not sharded by FSDP: averaged the same way, over the dp part of the 2-D mesh). `full` recompute of sharded F units goes through torch's
     non-reentrant checkpoint (recompute.py), which re-runs F's forward and hooks in backward.
   - Split-backward schedules (ZBV, DualPipeV): per block as above under bf16 (the units kept gathered from forward
     to the weight half of the backward, which reads the parameters registered at its input half: a resharded unit
     would lose its weight gradients); one unit per stage in fp32 (nothing to cast, and the layout tested longest).
   - A pipeline at dp = 1 under bf16 autocast: per block over a one-rank mesh (`build.stage_fsdp`), for the bf16
     compute weights alone; its "gathers" are local casts, so the units reshard after each forward (1F1B,
     interleaved), and autograd holds no weight copy between a micro-batch's forward and its backward.
   `shard(reshard_after_forward=False)` (the pipeline's choice) keeps the non-root units gathered from forward to
   backward.
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
3. Mixed precision (train.precision=bf16) where units follow the computation (note 1): the units and the root are
   gathered in bf16 from the fp32 shards (half the all-gather traffic; bf16 GEMM weights, so autocast has nothing
   to cast and keeps no bf16 copy of a weight for backward; the gathered weight is freed after its unit) and their
   gradients reduce-scattered in fp32 into the fp32 master shards. The coefficient path (phi, gates, biases,
   Sinkhorn) never sees a rounded weight: per block, every connection site with parameters is a unit of its own
   gathered in fp32; per F module, the sites are not in FSDP at all (fp32, replicated). Inputs are never cast
   (`cast_forward_inputs=False`): the stream keeps model.stream_dtype. Where the whole module is one unit
   (split-backward schedules in fp32, CSV schedules) the gathers stay fp32, since a module-wide bf16 cast would round
   phi; autocast still runs the GEMMs in bf16.
"""

from __future__ import annotations

import copy

import torch

from mhc_train.parallel.clip import clip_grads
from mhc_train.parallel.compile import apply_compile as compile_blocks
from mhc_train.parallel.dist import mean_over_mesh_
from mhc_train.parallel.engine import LocalEngine, release_eval_copy, stream_into_host
from mhc_train.parallel.expert_parallel import distribute_experts, scale_expert_grads
from mhc_train.parallel.state import full, local, materialise, on_meta


def shard(
    module: torch.nn.Module, mesh, per_block: bool = False, compute_dtype=None, reshard_after_forward: bool = True
) -> torch.nn.Module:
    """FSDP2 over `mesh`. With `per_block`, units follow the computation (note 1): without a block runner one unit per
    block plus the root; with a recompute runner one unit per F module (`layer.attn`, `layer.ffn`) and the root, the
    connection sites and the blocks' norms left out (replicated, `sync_replicated_grads`). Otherwise one unit for the
    whole module. `compute_dtype` (bf16 under train.precision=bf16, else None): mixed precision for per-block units
    (note 3). `reshard_after_forward=False` keeps the non-root units gathered from forward to backward (the pipeline's
    choice: no second all-gather per micro-batch); the root always keeps FSDP's default."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    root_kw = {} if reshard_after_forward else {"reshard_after_forward": False}
    experts = distribute_experts(module, mesh, compute_dtype if per_block else None)  # on ep, not in FSDP's units
    if experts:
        root_kw["ignored_params"] = experts
    if not per_block:
        return fully_shard(module, mesh=mesh, **root_kw)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    low = (
        fp32 if compute_dtype is None else MixedPrecisionPolicy(compute_dtype, torch.float32, cast_forward_inputs=False)
    )
    unit = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if experts:
        unit["ignored_params"] = experts
    if module.block_runner is not None:
        return _shard_compute_units(module, low, unit, root_kw)
    from mhc_train.model.connections import Site

    for layer in module.layers.values():
        if compute_dtype is not None:
            for site in layer.modules():
                if isinstance(site, Site) and next(site.parameters(), None) is not None:
                    fully_shard(site, **unit, mp_policy=fp32)
        fully_shard(layer, **unit, mp_policy=low)
    return fully_shard(module, mesh=mesh, mp_policy=low, **root_kw)


def _shard_compute_units(module, low, unit: dict, root_kw: dict) -> torch.nn.Module:
    """Recompute layout (note 1): each site's F module is a unit (the runner calls its forward, so FSDP's hooks fire
    there, in the forward and in any recomputation); the sites' and norms' parameters stay plain fp32 tensors."""
    from torch.distributed.fsdp import fully_shard

    replicated = set()
    for part in module.site_parts():
        fully_shard(part.owner, **unit, mp_policy=low)
        replicated.update([*part.site.parameters(), *part.norm.parameters()])
    root_kw = {**root_kw, "ignored_params": replicated | root_kw.get("ignored_params", set())}
    return fully_shard(module, mesh=unit["mesh"], mp_policy=low, **root_kw)


def replicated_params(modules) -> list[torch.Tensor]:
    """The parameters FSDP leaves whole on every rank where it shards the others (the recompute layout, note 1):
    plain tensors next to DTensor shards. Empty where nothing is sharded (no FSDP) or everything is."""
    params = [p for m in modules for p in m.parameters()]
    if not any(_dp_sharded(p) for p in params):
        return []
    return [p for p in params if not _dp_sharded(p)]


def _dp_sharded(p: torch.Tensor) -> bool:
    """Whether FSDP sharded `p`: a DTensor on a mesh other than tensor parallelism's alone (under TP x FSDP the norms'
    gains FSDP leaves out are `Replicate` DTensors over ("tp",): replicated over the data-parallel ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) and p.device_mesh.mesh_dim_names != ("tp",)


def _data_parallel_part(mesh):
    """The data-parallel dims of an FSDP parameter's mesh: the mesh itself, or its dp part under TP x FSDP (2-D)."""
    names = mesh.mesh_dim_names or ()
    return mesh[tuple(n for n in names if n != "tp")] if "tp" in names else mesh


def sync_replicated_grads(modules) -> set:
    """Average the replicated parameters' gradients over the data-parallel mesh (the sharded parameters' mesh, every
    dimension: HSDP included), in one flat fp32 all-reduce: what FSDP's reduce-scatter does for its units, for the
    parameters it leaves out. Call once per step, after the last backward; returns those parameters (a clip counts
    them once, not once per rank)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = replicated_params(modules)
    grads = [local(p.grad) for p in params if p.grad is not None]
    if grads:
        mesh = _data_parallel_part(next(p for m in modules for p in m.parameters() if _dp_sharded(p)).device_mesh)
        if mesh.size() == 1:  # a pipeline's stage sharded over one rank for its bf16 weights alone: nothing to average
            return set(params)
        flat = _flatten_dense_tensors([g.float() for g in grads])
        mean_over_mesh_(flat, mesh)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    return set(params)


class FSDPEngine(LocalEngine):
    """FSDP2 over all ranks, no pipeline. Trains a sharded copy; `self.model` stays plain for rank 0's evaluation."""

    name = "fsdp"
    checkpoint_formats = ("dcp", "file")

    def __init__(self, model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype,
                 grad_accum: int, compile: bool = False, seed: int = 0, weights: dict | None = None,
                 mesh=None, prepare=None):  # fmt: skip
        self.mesh, mesh = mesh, mesh.dp_mesh()  # a `mesh.ParallelMesh`: FSDP2 over dp_shard, HSDP over both dp dims
        built_on_meta = on_meta(model)
        # a copy of a meta skeleton is free
        train_model = copy.deepcopy(model)
        if prepare is not None:  # tensor parallelism's plan on the copy, before sharding (build.py step 2)
            prepare(train_model)
        if compile:  # per block, before sharding (parallel/compile.py)
            compile_blocks(train_model)
        self.train_model = shard(train_model, mesh, per_block=True, compute_dtype=autocast_dtype)
        if built_on_meta:
            materialise(self.train_model, device, seed, weights)  # this rank's shards only (note 2)
        else:
            release_eval_copy(model, dist)
        optimizer = build_optimizer(self.train_model)
        super().__init__(model, optimizer, build_scheduler(optimizer), dist, device, grad_clip, autocast_dtype,
                         grad_accum)  # fmt: skip
        self.forward = self.train_model

    def describe(self) -> str:
        """The mesh (dp_replicate x dp_shard, HSDP where replicated) and what this rank holds: its shards of the
        sharded parameters, and the ones FSDP leaves whole on every rank (recompute layout, note 1)."""
        replicated = set(replicated_params([self.train_model]))
        shards = sum(local(p).numel() for p in self.train_model.parameters() if p not in replicated)
        whole = sum(p.numel() for p in replicated)
        total = sum(p.numel() for p in self.model.parameters())
        m = self.mesh
        kind = (
            f"HSDP dp_replicate={m.dp_replicate} x dp_shard={m.dp_shard}"
            if m.dp_replicate > 1
            else (f"dp_shard={m.dp_shard}")
        ) + (f", experts on ep={m.ep}" if m.ep > 1 else "")
        return (
            f"fsdp: {self.dist.world} ranks ({kind}); rank {self.dist.rank} holds {shards + whole:,} of {total:,} "
            f"parameter elements ({shards:,} in shards, {whole:,} replicated)"
        )

    def train_parameters(self):
        return self.train_model.parameters()

    def backward(self, loss, micro: int) -> None:
        """Reduce-scatter the gradients once per step, in the last micro-batch (FSDP2 accumulates unsharded
        gradients locally before it); the parameters FSDP leaves replicated (recompute layout, note 1) are averaged
        over the data-parallel ranks then too."""
        last = micro == self.grad_accum - 1
        self.train_model.set_requires_gradient_sync(last)
        (loss / self.grad_accum).backward()
        if last:
            sync_replicated_grads([self.train_model])
            scale_expert_grads(self.train_model, self.mesh.dp)  # the experts served every data-parallel rank's tokens

    def clip(self) -> torch.Tensor:
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        params = self.params_with_grad()
        replicated = set(replicated_params([self.train_model]))
        meshes = {getattr(p, "device_mesh", None) for p in params if p not in replicated}  # 2 with ep below dp
        if not replicated and len(meshes) < 2:
            return full(torch.nn.utils.clip_grad_norm_(params, limit))
        return clip_grads(params, self.grad_clip, self.dist, self.device)  # DTensor shards beside plain tensors

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
        return self.train_model, self.train_model

    def after_diag(self) -> None:
        reshard_all([self.train_model])

    def _sync_full_model(self) -> None:
        stream_into_host(self.model, self.train_model, self.dist.is_main)

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
