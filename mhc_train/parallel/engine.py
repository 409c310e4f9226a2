"""The engine contract: what the trainer drives, whatever the parallelism.

An engine owns the training copy of the model (the plain model itself, a DDP/DeepSpeed wrapper, FSDP shards or this
rank's pipeline stages), its optimizer and LR scheduler, and the forward/backward of one optimiser step. The trainer
holds an `Engine`, calls the methods below in this order each step, and never asks which engine it is:

    loss = engine.forward_backward(batch)      # every micro-batch of this step; the global mean loss on every rank
    grads = engine.gather_grads()               # (debug) full reduced gradients by name on rank 0; a collective
    lr = engine.lr(); norm = engine.step()      # clip, optimizer and scheduler step; returns the pre-clip norm
    # or engine.skip() for a step with a non-finite loss
    val = engine.evaluate(batches)              # the mean loss over the full val batches, each rank its slice
    sites = engine.site_statistics(tokens, SiteProbe)  # the diagnostics, where the weights live; a collective
    model = engine.full_model()                 # the plain model with the trained weights (rank 0); a collective
                                                # (export and file checkpoints only: never on a training step)

`loss` and `norm` are 0-dim tensors on the compute device that nothing has read yet: no method of a step reads a
value on the host, so on CUDA the host runs ahead of the GPU and the trainer reads the step's scalars once, together
(`dist.read_scalars`): one host sync per step.

Checkpoints go through `mhc_train.checkpoint`, which owns all checkpoint state and uses the engine's
primitives: `checkpoint_formats`, `optimizer_state` / `load_optimizer_state` (by parameter name, full tensors),
`live_state` (torch DCP, sharded as trained) and `save_native` / `load_native` (an engine's own format).

`batch(micro, shard, n_shards) -> (x, y)` is the trainer's data: micro-batch `micro` of this step, slice `shard`
of `n_shards` of the global batch. Each engine knows its micro-batch count and which data-parallel slice it trains.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable

import torch

from mhc_train.model.moe import set_aux_loss_scale
from mhc_train.parallel import state
from mhc_train.parallel.dist import DistInfo, reduce_sum, sum_across_ranks
from mhc_train.parallel.expert_parallel import balance_experts, moe_metrics, reset_counts

BatchFn = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def release_eval_copy(model: torch.nn.Module, info) -> None:
    """Only rank 0 writes checkpoint files from the plain model; once an engine trains its own
    copy, the other ranks move theirs to the meta device (shapes kept, storage freed: one whole model per rank)."""
    if not info.is_main:
        model.to(torch.device("meta"))


def materialise_on_host(model: torch.nn.Module, weights: dict) -> None:
    """Rank 0's plain view of a sharded engine: built on the meta device and kept there until something needs it
    whole (a file checkpoint, an export); then allocated in host memory, never on the accelerator, and filled."""
    if state.on_meta(model):
        state.to_empty_tied(model, "cpu")  # a tied head stays the embedding's parameter
        model.init_buffers()
    model.load_state_dict(weights)


def host_state(model: torch.nn.Module) -> dict:
    """Rank 0's plain view allocated in host memory (from meta, once) and its state dict, whose tensors share the
    model's storage: a sharded engine fills it in place one gathered tensor at a time, so rank 0 never holds a second
    copy of the model beside it."""
    if state.on_meta(model):
        state.to_empty_tied(model, "cpu")  # a tied head stays the embedding's parameter
        model.init_buffers()
    return model.state_dict()


def stream_into_host(model: torch.nn.Module, train_model: torch.nn.Module, is_main: bool) -> None:
    """Fill rank 0's plain `model` from a sharded `train_model` (FSDP2 / DTensor) one tensor at a time: every rank
    joins each all-gather, rank 0 copies the whole tensor into its host view and drops it, so no rank ever holds a
    dict of the whole model beside it."""
    target = host_state(model) if is_main else None
    for k, v in train_model.state_dict().items():
        whole = state.full(v).detach()  # a collective: every rank
        if target is not None:
            target[k].copy_(whole)


@contextlib.contextmanager
def plain_blocks(module: torch.nn.Module):
    """`module`'s blocks as the plain loop for the duration (a recompute runner calls the sites without their forward,
    so their hooks would not run); its runner restored after."""
    runner = module.block_runner
    module.use_block_runner(None)
    try:
        yield module
    finally:
        module.use_block_runner(runner)


class Engine:
    """Base class and the single-model default; subclasses override what their parallelism changes."""

    name = "engine"  # for logs only; nothing branches on it
    checkpoint_formats: tuple[str, ...] = ("file", "dcp")  # what `save` can write; the first is checkpoint.format=auto

    def __init__(self, model, optimizer, scheduler, dist: DistInfo, device, grad_clip: float, autocast_dtype=None):
        self.model = model  # the plain model: rank 0's full view for checkpoint files (and where whole, everything)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dist, self.device, self.grad_clip = dist, torch.device(device), grad_clip
        self.autocast_dtype = autocast_dtype
        # this rank's data-parallel slice of each batch, of how many (tensor parallelism: the ranks of one tp group
        # read the same slice; `tensor_parallel.TPEngine` sets them from the mesh)
        self.data_shard, self.data_shards = dist.rank, dist.world
        # optimiser steps taken / reflected in `self.model`; a plain view left on meta (sharded engines, pipelines)
        # reflects nothing yet, so the first `full_model` gathers even before a step
        self._version, self._synced = 0, -1 if state.on_meta(model) else 0

    # ---- one optimiser step ------------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch onto the compute device: pinned and copied without blocking the host on CUDA."""
        if self.device.type != "cuda" or t.is_cuda:
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def loss(self, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():  # the model's loss, chunked over tokens (no full fp32 logits: model.chunked_lm_loss)
            return forward(self.to_device(x), self.to_device(y))

    def forward_backward(self, batch: BatchFn) -> torch.Tensor:
        """Forward and backward of every micro-batch of this step; returns the global mean loss on every rank (a
        0-dim device tensor, not read on the host)."""
        raise NotImplementedError

    def params_with_grad(self) -> list[torch.Tensor]:
        return [p for p in self.train_parameters() if p.grad is not None]

    def clip(self) -> torch.Tensor:
        """The global pre-clip gradient norm (a device tensor); scales the gradients to `grad_clip` when it is
        exceeded (0: never), on the device, without reading the norm on the host."""
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params_with_grad(), limit)

    def step(self) -> torch.Tensor:
        """Clip, optimizer step, scheduler step, zero the gradients; returns the pre-clip gradient norm (a device
        tensor, not read on the host)."""
        norm = self.clip()
        self.optimizer.step()
        self.balance_experts()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._version += 1
        return norm

    def balance_experts(self) -> None:
        """MoE models: the balancing bias update from this step's global expert load (expert_parallel.py)."""
        cfg = getattr(self.model, "cfg", None)
        if getattr(cfg, "ffn", "dense") == "moe":
            balance_experts(self.live_modules(), self.dist, cfg)

    def moe_metrics(self) -> dict:
        """Per MoE layer, the last step's load, drops, router entropy and bias on rank 0 ({}: no MoE). A collective."""
        if getattr(getattr(self.model, "cfg", None), "ffn", "dense") != "moe":
            return {}
        return moe_metrics(self.live_modules(), self.dist)

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss); the schedule advances as if it had stepped."""
        self.optimizer.zero_grad(set_to_none=True)
        reset_counts(self.live_modules())
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ---- evaluation ------------------------------------------------------------------------------------------
    def eval_forward(self):
        """The module that evaluates: the trained copy itself where it is sharded (its hooks gather the weights),
        the plain model where it is whole (no wrapper, so no gradient hooks)."""
        return self.model

    def evaluate(self, batches) -> float:
        """Mean loss over `batches` (the same full batches on every rank): each rank evaluates its data-parallel
        slice of each batch, and the sum is reduced once. A collective: every rank calls it."""
        total = self.eval_loss_sum(self.eval_forward(), batches, self.data_shard, self.data_shards)
        return sum_across_ranks(total, self.dist, self.device) / (self.dist.world * len(batches))  # tp copies: mean

    @torch.no_grad()
    def eval_loss_sum(self, forward, batches, shard: int, n_shards: int) -> torch.Tensor:
        """The sum over `batches` of the mean loss of slice `shard` of `n_shards` of each batch (no collective)."""
        forward.eval()
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            per = x.shape[0] // n_shards
            rows = slice(shard * per, (shard + 1) * per)
            total += self.loss(forward, x[rows], y[rows]).detach()
        forward.train()
        return total

    # ---- diagnostics -----------------------------------------------------------------------------------------
    def diag_modules(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(the module holding the sites, the module whose forward runs them) where the trained weights are sharded:
        every rank then runs the diagnostics through it, its hooks gathering one unit at a time as for evaluation.
        None: the weights are whole on rank 0, which diagnoses the plain model alone."""
        return None

    def after_diag(self) -> None:
        """Undo what a forward without backward leaves behind (FSDP: unsharded root parameters)."""

    def site_statistics(self, tokens: torch.Tensor, new_probe) -> dict | None:
        """Every connection site's statistics on `tokens` [B, T] (the same batch on every rank), {name: stats} in
        forward order on rank 0 (None elsewhere). `new_probe()` gives a `train.diagnostics.SiteProbe`. Computed on
        the compute device where the weights live, never on a gathered whole model: a sharded engine runs the batch
        through its own copy on every rank (no autocast where the weights are whole: the one-process numbers; the
        engine's autocast where they are sharded, as for evaluation). A collective where the weights are sharded."""
        sharded = self.diag_modules()
        if sharded is None and not self.dist.is_main:
            return None
        probe, x = new_probe(), self.to_device(tokens)
        if sharded is None:
            with probe.capture(self.model):
                self.model.run_blocks(self.model.embed(x), plain=True)  # the plain loop calls every site
        else:
            module, forward = sharded
            try:
                with probe.capture(module), plain_blocks(module), self.autocast():
                    forward(x)
            finally:
                self.after_diag()
        probe.forward(None)  # one run of sites: nothing before it, nothing after
        probe.backward(None)
        return probe.sites if self.dist.is_main else None

    # ---- views -------------------------------------------------------------------------------------------------
    def train_parameters(self) -> Iterable[torch.Tensor]:
        """The parameters this rank trains (shards or stages included)."""
        return self.model.parameters()

    def param_names(self) -> dict:
        """{trained parameter: its name in the plain model} (stages and shards keep the plain names)."""
        return {p: n for n, p in self.model.named_parameters()}

    def _sync_full_model(self) -> None:
        """Copy the trained weights into rank 0's `self.model` (a collective where they are sharded or cut)."""

    def full_model(self) -> torch.nn.Module:
        """The plain model holding the current weights on rank 0 (other ranks may hold a meta copy), for file
        checkpoints and export only: a sharded engine gathers the whole model for it, so nothing on a training step
        calls it (diagnostics: `site_statistics`). A collective where the weights are sharded or cut: every rank
        calls it; it syncs at most once per optimiser step."""
        if self._synced != self._version:
            self._sync_full_model()
            self._synced = self._version
        return self.model

    def weights_loaded(self) -> None:
        """The trained weights were replaced in place (a DCP load): the next `full_model` syncs."""
        self._synced = -1

    def local_named_grads(self) -> Iterable[tuple[str, torch.Tensor]] | None:
        """(name, full reduced gradient) of the plain model where it holds them without a collective, else None."""
        return None

    def gather_grads(self) -> dict:
        """Every parameter's full, reduced gradient by name on rank 0, between backward and step. A collective."""
        return {n: p.grad.detach().cpu().clone() for p, n in self.param_names().items() if p.grad is not None}

    def describe(self) -> str:
        """One line on the layout, logged at start ("" for none)."""
        return ""

    def report(self) -> str:
        """One line on what the engine did in the first step, logged after it ("" for nothing to say)."""
        return ""

    # ---- checkpoint primitives (used by mhc_train.checkpoint) ---------------------------------------------------
    def optimizer_state(self) -> dict:
        """Optimizer state by parameter name, full tensors, merged on rank 0 ({} elsewhere). A collective."""
        return state.optimizer_state_by_name(self.optimizer, self.param_names(), gather=True)

    def load_optimizer_state(self, saved: dict) -> bool:
        """A by-name optimizer state (from any layout), each tensor re-laid out like its parameter; False where the
        engine cannot take one (it then starts from a fresh optimizer state)."""
        state.load_optimizer_state_by_name(self.optimizer, saved, self.param_names())
        return True

    def live_modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def live_state(self) -> dict:
        """Live model and optimizer tensors by parameter name, for a DCP save or an in-place DCP load."""
        return state.live_state(self.live_modules(), self.optimizer, self.param_names())

    def save_native(self, directory, tag: str) -> None:
        raise NotImplementedError(f"{self.name} has no native checkpoint format")

    def load_native(self, directory, tag: str) -> None:
        raise NotImplementedError(f"{self.name} has no native checkpoint format")

    def teardown(self) -> None:
        """Release what the engine holds beyond the process group (nothing by default)."""


def no_buffer_sync() -> dict:
    """DDP's keyword for "no buffer broadcast before each forward": `forward_sync_buffers=False` where this torch has
    it (its `broadcast_buffers` warns a FutureWarning on every rank), `broadcast_buffers=False` before."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class LocalEngine(Engine):
    """One process, or torch DDP across ranks (gradients averaged during backward); trains the plain model itself."""

    name = "torch"

    def __init__(self, model, optimizer, scheduler, dist, device, grad_clip, autocast_dtype, grad_accum: int,
                 ddp: bool = False):  # fmt: skip
        super().__init__(model, optimizer, scheduler, dist, device, grad_clip, autocast_dtype)
        self.grad_accum = grad_accum
        forward = model
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [dist.local_rank] if self.device.type == "cuda" else None
            # no buffer sync per forward: the only buffer (RoPE's table) is constant, and a per-forward broadcast
            # would make rank 0's evaluation wait on the other ranks
            forward = DistributedDataParallel(model, device_ids=ids, **no_buffer_sync())
        self.forward = forward  # train.compile: the blocks were compiled in place (build.apply_compile)

    @property
    def forward(self) -> torch.nn.Module:
        """The module a training step runs (the model, its DDP / FSDP / TP copy, DeepSpeed's engine)."""
        return self._forward

    @forward.setter
    def forward(self, module: torch.nn.Module) -> None:
        # MoE's auxiliary loss weighs as the LM loss does (1 / grad_accum): set once here, where every engine names
        # the module it trains, not by walking the modules at every step
        self._forward = module
        set_aux_loss_scale(module, 1 / self.grad_accum)

    def backward(self, loss: torch.Tensor, micro: int) -> None:
        """Accumulate this micro-batch's gradient; data parallel reduces once per step, in the last micro-batch."""
        last = micro == self.grad_accum - 1
        with contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") else self.forward.no_sync():
            (loss / self.grad_accum).backward()

    def forward_backward(self, batch: BatchFn) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = batch(micro, self.data_shard, self.data_shards)
            loss = self.loss(self.forward, x, y)
            self.backward(loss, micro)
            total += loss.detach() / self.grad_accum
        return reduce_sum(total, self.dist, self.device) / self.dist.world

    def local_named_grads(self):
        return [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
