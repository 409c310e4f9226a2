"""Tensor and sequence parallelism (`parallel.tp`): the Megatron / torchtitan plan applied to a plain model from outside
(`apply_tp`), a vocab-parallel loss, and the engine that trains a tensor-parallel copy (`TPEngine`).

Axis legend: B batch, T time (T/tp: this rank's slice), n streams, C channels, V vocabulary (V/tp: this rank's).

The plan (torch's DTensor `parallelize_module` over the mesh's tp dimension):

    tok_embeddings     RowwiseParallel: vocab-sharded table, output reduce-scattered along T  -> [B, T/tp, C]
    stream state       [B, T/tp, n, C], a plain local tensor between the sub-layers (sequence parallel)
    connection site    runs on the local slice, no communication (the math is per token: docs/mhc.md section 2)
    attn_norm/ffn_norm SequenceParallel: the RMSNorm on the local slice, gain replicated
    attn, ffn          input all-gathered along T -> [B, T, C]; wq/wk/wv, w1/w3 column-parallel (local heads),
                       wo, w2 row-parallel with the output reduce-scattered along T -> [B, T/tp, C]
    norm, output       the final RMSNorm on the slice; the head column-parallel (vocab-sharded), its input gathered
    loss               `VocabParallelLoss`: cross-entropy on the local [B, T, V/tp] logits (never [B, T, V])

Notable choices:
- The connection sites' parameters stay plain tensors, whole on every tp rank (the Triton kernels take plain local
  tensors); each rank's gradient covers its own tokens only, so the engine sums them over tp once per step, after
  the last backward, in one flat all-reduce (`sum_site_grads`; a per-tensor gradient hook would fire twice under
  recomputation, whose backward calls autograd on the parameters itself).
- The norms' gains are `Replicate` DTensors (SequenceParallel): DTensor sums their partial gradients over tp.
- The loss is computed in chunks of tokens (the same cap as `chunked_lm_loss`), each chunk's logits recomputed in
  backward; max, sum of exp and the target logit are all-reduced over tp (three scalars per token).
- Refusals (config time, `config/validate_tp.py`): heads, KV heads, the FFN width, the vocabulary and the
  sequence must divide by tp; DeepSpeed and DDP with tp > 1; the split-backward and CSV pipeline schedules with
  tp > 1 (1F1B and interleaved 1F1B run it); context parallelism.
- Composition: the plan is applied before recompute and FSDP2 (build.py), also to each cut pipeline stage, whose
  boundary then carries this rank's [B, T/tp, n, C] slice. Norms' gains FSDP leaves out under recompute stay
  `Replicate` DTensors over tp (fsdp.py averages them over dp). Diagnostics gather each site's coefficients along T
  over tp (`SequenceParallelDiagnostics`, the pipeline's probes too): rank 0 logs one process's statistics.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mhc_train.model import transformer
from mhc_train.parallel.clip import clip_grads
from mhc_train.parallel.dist import all_reduce_over, sum_over_group
from mhc_train.parallel.engine import LocalEngine, release_eval_copy, stream_into_host
from mhc_train.parallel.fsdp import FSDPEngine
from mhc_train.parallel.state import full, local


def block_plan() -> dict:
    """The per-block plan: norms sequence-parallel, F's input gathered, column then row parallel, output scattered."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

    gather_x = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return {
        "attn_norm": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attn.wq": ColwiseParallel(),
        "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "ffn": gather_x,
        "ffn.w1": ColwiseParallel(),
        "ffn.w3": ColwiseParallel(),
        "ffn.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def apply_tp(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """2. Tensor + sequence parallelism over the 1-D `tp_mesh`, in place (plan in the module docstring): every
    parameter but the connection sites' becomes a DTensor on `tp_mesh` (the sites' gradients: `sum_site_grads` after
    the backward); the model's loss becomes `VocabParallelLoss`. A stage without the embedding or the head skips them."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

    if model.cfg.tie_embeddings:
        raise NotImplementedError("parallel.tp > 1 with model.tie_embeddings: the head and the table shard differently")
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel(use_local_output=True)
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan())
    if model.output is not None:
        model.use_loss(VocabParallelLoss(tp_mesh))
    return model


def sum_site_grads(model: torch.nn.Module, tp_mesh) -> None:
    """Sum the plain (tp-replicated) parameters' gradients over `tp_mesh` in place: the connection sites', each
    rank's from its own slice of the sequence. One flat fp32 all-reduce; call once per step, after the last backward."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.tensor import DTensor

    def replicated(p) -> bool:  # plain, or sharded by FSDP over the data-parallel dims only
        return not isinstance(p, DTensor) or "tp" not in (p.device_mesh.mesh_dim_names or ())

    grads = [local(p.grad) for p in model.parameters() if replicated(p) and p.grad is not None]
    if grads:
        flat = sum_over_group(_flatten_dense_tensors([g.float() for g in grads]), tp_mesh.get_group())
        for g, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(summed)


def match_grad_placements(model: torch.nn.Module) -> None:
    """Redistribute each DTensor gradient whose placements differ from its parameter's to the parameter's, in place:
    DTensor leaves some `Partial` over tp (the norms' `Replicate` gains under SequenceParallel, each rank's from its
    own tokens) or whole (the vocab-sharded embedding's), which a caller that reads local gradients (the pipeline's
    clip) would count wrongly. The optimizer does the same redistribution on its first use of the gradient."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)


def tp_copies(p: torch.Tensor, tp: int) -> int:
    """How many tp ranks hold `p`'s local gradient whole: tp for a parameter replicated over tp (the sites' plain
    tensors, FSDP's 1-D shards, the norms' `Replicate` gains), 1 for one sharded over tp (a norm sums it once)."""
    from torch.distributed.tensor import DTensor

    names = p.device_mesh.mesh_dim_names or () if isinstance(p, DTensor) else ()
    if tp == 1 or "tp" not in names:
        return tp
    return tp if p.placements[names.index("tp")].is_replicate() else 1


# ---- the loss on vocab-sharded logits -------------------------------------------------------------------------
class _VocabParallelCE(torch.autograd.Function):
    """Sum over tokens of the cross-entropy of logits sharded along the vocabulary: local [N, V/tp] fp32, this
    rank's columns starting at `offset`. Saves the local softmax ([N, V/tp]); three all-reduces of [N] each."""

    @staticmethod
    def forward(ctx, logits, targets, offset: int, group):
        peak = logits.max(-1).values  # [N]
        all_reduce_over(peak, group, "max")
        z = logits - peak[:, None]  # [N, V/tp]
        exp = z.exp()
        total = exp.sum(-1)  # [N]
        all_reduce_over(total, group)
        local_t = targets - offset
        mine = (local_t >= 0) & (local_t < logits.shape[-1])
        picked = torch.take_along_dim(z, local_t.clamp(0, logits.shape[-1] - 1)[:, None], -1)[:, 0] * mine  # [N]
        all_reduce_over(picked, group)
        ctx.save_for_backward(exp.div_(total[:, None]), local_t, mine)
        return (total.log() - picked).sum()

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, mine = ctx.saved_tensors
        grad = softmax.clone()  # d/dz of the sum: softmax - one_hot(target)
        rows = torch.nonzero(mine)[:, 0]
        grad[rows, local_t[rows]] -= 1.0
        return grad * g, None, None, None


def gather_tokens(h: torch.Tensor, tp_mesh) -> torch.Tensor:
    """[B, T/tp, C] -> [B, T, C] (all-gather along T); backward reduce-scatters (each rank's partial gradient)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    dt = DTensor.from_local(h, tp_mesh, [Shard(1)], run_check=False)
    return dt.redistribute(tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])


class VocabParallelLoss:
    """The mean next-token loss from this rank's hidden slice h [B, T/tp, C] and the column-parallel head (weight a
    DTensor sharded along V): h gathered along T, local logits [chunk, V/tp] per chunk of tokens (recomputed in
    backward), cross-entropy reduced over tp. Equals `chunked_lm_loss` on the gathered model up to fp32 rounding."""

    def __init__(self, tp_mesh):
        self.mesh, self.group = tp_mesh, tp_mesh.get_group()

    def __call__(self, h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        weight = head.weight.to_local()  # [V/tp, C]; its gradient lands on the DTensor's shard
        rank = torch.distributed.get_rank(self.group)
        offset = rank * weight.shape[0]
        flat_h = gather_tokens(h, self.mesh).flatten(0, 1)  # [N, C]
        flat_t = targets.flatten()
        # fp32 local logits per chunk: the model's constant, read per call (tests lower it)
        n, per = flat_t.numel(), max(1, transformer.LOSS_CHUNK_ELEMENTS // weight.shape[0])
        if n <= per:
            return self._chunk(flat_h, weight, flat_t, offset) / n
        sums = [
            checkpoint(self._chunk, flat_h[i : i + per], weight, flat_t[i : i + per], offset, use_reentrant=False)
            for i in range(0, n, per)
        ]
        return torch.stack(sums).sum() / n

    def _chunk(self, h, weight, targets, offset):
        logits = F.linear(h, weight).float()  # [chunk, V/tp]
        return _VocabParallelCE.apply(logits, targets, offset, self.group)


# ---- the engines ------------------------------------------------------------------------------------------------
class SequenceParallelDiagnostics:
    """Engine mixin: the diagnostics' site statistics over the whole batch, not this rank's T/tp tokens (each probe's
    coefficients gathered along T over tp before its statistics), so rank 0 logs one process's numbers."""

    tp_mesh = None

    def site_statistics(self, tokens: torch.Tensor, new_probe) -> dict | None:
        def probe():
            p = new_probe()
            p.whole_tokens = lambda c: gather_tokens(c.contiguous(), self.tp_mesh)
            return p

        return super().site_statistics(tokens, probe)


class TPEngine(SequenceParallelDiagnostics, LocalEngine):
    """Tensor (+ sequence) parallelism over the mesh's tp ranks, no data parallelism beyond (`parallel.engine=none`
    with world = tp): trains a tensor-parallel copy; `self.model` stays plain for rank 0's files and export. The ranks
    of a tp group read the same data slice (`data_shard` = the mesh's dp rank)."""

    name = "tp"
    checkpoint_formats = ("dcp", "file")

    def __init__(self, model, ctx, compile_fn=None):
        mesh, t = ctx.mesh, ctx.cfg.train
        self.tp_mesh = mesh.tp_mesh()
        self.train_model = apply_tp(copy.deepcopy(model), self.tp_mesh)
        if compile_fn is not None:  # per block, after the plan (a copy of a compiled module calls the original)
            compile_fn(self.train_model)
        release_eval_copy(model, ctx.dist)
        optimizer = ctx.make_optimizer(self.train_model)
        super().__init__(model, optimizer, ctx.make_scheduler(optimizer), ctx.dist, ctx.device,
                         ctx.cfg.optim.grad_clip, ctx.amp, t.grad_accum)  # fmt: skip
        self.forward = self.train_model
        self.data_shard, self.data_shards = mesh.dp_rank, mesh.dp
        self.tp = mesh.tp

    def backward(self, loss, micro: int) -> None:
        super().backward(loss, micro)
        if micro == self.grad_accum - 1:
            sum_site_grads(self.train_model, self.tp_mesh)

    def describe(self) -> str:
        held = sum(local(p).numel() for p in self.train_model.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return f"tp: {self.tp} ranks; rank {self.dist.rank} holds {held:,} of {total:,} parameter elements"

    def train_parameters(self):
        return self.train_model.parameters()

    def clip(self) -> torch.Tensor:
        return clip_grads(self.params_with_grad(), self.grad_clip, self.dist, self.device)

    def param_names(self) -> dict:
        return {p: n for n, p in self.train_model.named_parameters()}

    def eval_forward(self):
        return self.train_model

    def diag_modules(self):
        return self.train_model, self.train_model

    def _sync_full_model(self) -> None:
        stream_into_host(self.model, self.train_model, self.dist.is_main)  # one tensor at a time, as FSDP does

    def gather_grads(self) -> dict:
        return {n: full(p.grad).detach().cpu().clone() for p, n in self.param_names().items() if p.grad is not None}

    def local_named_grads(self):
        return None

    def live_modules(self):
        return [self.train_model]


class TPFSDPEngine(SequenceParallelDiagnostics, FSDPEngine):
    """TP x FSDP2 (2-D: `parallel.tp` > 1 with `parallel.engine=fsdp`): the plan applied to FSDPEngine's copy before
    it shards it over the data-parallel dims, so every TP parameter is a 2-D DTensor (dp_shard, tp) and the sites'
    parameters 1-D over dp_shard (their gradients summed over tp after FSDP's reduce-scatter)."""

    name = "tp+fsdp"

    def __init__(self, model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype,
                 grad_accum: int, compile: bool = False, seed: int = 0, weights: dict | None = None,
                 mesh=None):  # fmt: skip
        self.tp_mesh = mesh.tp_mesh()
        super().__init__(model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype, grad_accum,
                         compile, seed, weights, mesh, prepare=lambda m: apply_tp(m, self.tp_mesh))  # fmt: skip
        self.data_shard, self.data_shards = mesh.dp_rank, mesh.dp

    def backward(self, loss, micro: int) -> None:
        super().backward(loss, micro)
        if micro == self.grad_accum - 1:
            sum_site_grads(self.train_model, self.tp_mesh)

    def clip(self) -> torch.Tensor:
        return clip_grads(self.params_with_grad(), self.grad_clip, self.dist, self.device)

    def describe(self) -> str:
        return f"tp x fsdp: tp={self.tp_mesh.size()}; " + super().describe()
