"""Pipeline parallelism on torch.distributed.pipelining, applied to a built model by cutting it into stages.

- Stages are cut from the plain model by deleting what a stage does not own (blocks outside its range; the embedding
  except on the first stage; the final norm and head except on the last), so every parameter keeps its original
  name and a checkpoint does not depend on the layout.
- One tensor crosses each stage boundary: the `[B, T, n, C]` stream state (n times the residual baseline's traffic);
  under tensor + sequence parallelism (tp > 1, the plan applied to each stage) this rank's `[B, T/tp, n, C]` slice,
  so the messages shrink by tp; the sites' gradients are summed over tp after the schedule's step.
- Schedules: `1f1b` (one stage per rank), `interleaved1f1b` (v stages per rank), the V-shaped `zbv` and `dualpipev`
  (rank r holds stages r and 2P-1-r; micro-batches enter and leave at rank 0), or a `csv` schedule file in torch's
  compute-only format (the file decides which stages each rank holds). DualPipeV's OVERLAP_F_B actions run through our
  own function (overlap.py): on CUDA one micro-batch's forward overlaps another's backward.
- Built on the meta device (`build.pipeline_engine`): each rank deep-copies its stages' view of the skeleton (free on
  meta), shards them (dp > 1) and materialises only them on its device, from the seed or a file checkpoint's weights.
  No rank holds another stage; the plain `model` stays on meta until `full_model()` (file checkpoints, export), which
  streams each stage from one replica to rank 0 tensor by tensor, into rank 0's plain model on the host.
- Pipeline x expert parallelism (parallel.ep = each stage's data-parallel size): each stage's MoE layers dispatch by
  all-to-all over the stage's data-parallel ranks, the experts `Shard(0)` there (expert_parallel.py); after the
  schedule's step their gradients are divided by dp (`scale_expert_grads`). torch's first-step metadata-inference
  forward must not count tokens for the balancing bias (`keep_moe_counts_through_inference`).
- Recompute is applied to each stage module on its own, so blocks never cross a stage boundary and each stage keeps
  its x_{l0} locally: recomputation never waits on communication (`recompute_block=stage`: one block per stage).
- Pipeline x data parallel: the ranks' `mesh.ParallelMesh` has pp outermost; each stage is sharded over its
  data-parallel sub-mesh with FSDP2 (HSDP with dp_replicate > 1), units gathered from forward to backward. Under bf16
  autocast the stages are FSDP2 units at dp = 1 too (a one-rank mesh): bf16 compute weights from fp32 masters
  (`build.stage_fsdp`).
- The last stage computes its micro-batch's loss inside its forward (the targets reach it as a keyword argument of
  the schedule's step): `chunked_lm_loss`, so no full [B, T, V] logits are held; the schedule's loss function passes
  that loss through.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from mhc_train.parallel.clip import clip_grads
from mhc_train.parallel.dist import gather_dicts, recv_from, reduce_sum, send_to, sum_across_ranks
from mhc_train.parallel.engine import Engine, host_state, plain_blocks
from mhc_train.parallel.expert_parallel import scale_expert_grads
from mhc_train.parallel.fsdp import reshard_all, sync_replicated_grads
from mhc_train.parallel.overlap import install_overlap, issue_order
from mhc_train.parallel.overlap_ep import hidden_all_to_alls
from mhc_train.parallel.schedules import build_schedule, layer_ranges
from mhc_train.parallel.state import full, local
from mhc_train.parallel.tensor_parallel import gather_tokens, match_grad_placements, sum_site_grads, tp_copies


def keep_resharding_after_backward(module) -> None:
    """A stage sharded over one rank for its bf16 compute weights alone (`build.stage_fsdp`): torch's stage turns
    FSDP's reshard-after-backward off before every backward (its units would then stay gathered from a micro-batch's
    backward to the next forward); here a re-gather is a local cast, so the units keep resharding after each backward
    too and the bf16 weights live only while a unit computes. Their gradients accumulate in fp32 meanwhile (FSDP2's
    unsharded accumulation), reduced at the step's end as before. No-op for a module FSDP does not wrap."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_reshard_after_backward(True)
        module.set_reshard_after_backward = lambda *args, **kwargs: None  # the stage's per-backward False


def keep_moe_counts_through_inference(stage) -> None:
    """torch's stage infers its tensors' metadata on the first step by running its module forward (with grad) on the
    first micro-batch or on uninitialised tensors of the received shapes: MoE layers would count those tokens in
    the balancing load (`MoE.load_stats`). Their counts are restored after it (the all-to-alls of expert parallelism
    still run in it, on every data-parallel rank of the stage alike). No-op without MoE layers."""
    from mhc_train.model.moe import moe_modules

    layers = [m for _, m in moe_modules(stage.submod)]
    for name in ("_forward_metadata_inference", "_shape_inference"):  # the name in this torch; an older one's
        original = getattr(stage, name, None)
        if original is None or not layers:
            continue

        def inference(*args, _original=original, **kwargs):
            saved = [m.load_stats.clone() for m in layers]
            try:
                return _original(*args, **kwargs)
            finally:
                for m, counts in zip(layers, saved):
                    m.load_stats.copy_(counts)

        setattr(stage, name, inference)


def stage_loss(loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss function: the last stage's forward already returned its micro-batch's mean loss (chunked
    over tokens, `Transformer.forward` with targets)."""
    return loss


@dataclass
class StagePlan:
    """This rank's stages: their global ids, the stage count, and {pipeline rank: its stage ids} (the schedule's)."""

    stage_ids: list[int]
    n_stages: int
    layout: dict[int, list[int]] = field(default_factory=dict)


def cut_stage(model, stage: int, n_stages: int):
    """A view of `model` holding only stage `stage`'s blocks (and the embedding / head at the ends). The stage shares
    its parameters with `model` (a shallow copy with its own module tables), so `model` stays current for them."""
    part = copy.copy(model)
    for key, value in list(vars(part).items()):  # own module tables and hook registries; shared leaves
        if isinstance(value, (dict, set)):
            setattr(part, key, copy.copy(value))
    keep = [str(i) for i in layer_ranges(len(model.layers), n_stages)[stage]]
    part.layers = torch.nn.ModuleDict({k: model.layers[k] for k in keep})
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm, part.output = None, None
        part.collapse_conn = None  # the final stream read (learned: DeepSeek-V4's head weights) lives on the last stage
    return part


class PipelineEngine(Engine):
    """This rank's pipeline stages under one schedule: one schedule step per optimiser step (each data-parallel
    replica's slice of the global batch is split into `n_microbatches`), a global grad-norm clip across stages, and
    full-model syncs to rank 0 for file checkpoints and export. `modules` are the stages already cut, recomputing,
    (dp > 1) sharded and materialised by `build.pipeline_engine`, `optimizer` built over them; this class adds the
    schedule. With dp > 1 the pipelining runtime drives FSDP2 itself."""

    name = "pipeline"
    checkpoint_formats = ("dcp", "file")

    def __init__(self, model, modules, optimizer, ctx, plan: StagePlan):
        from torch.distributed.pipelining import PipelineStage

        p, mesh = ctx.cfg.parallel, ctx.mesh
        self.modules, self.mesh, self.stage_ids, self.n_stages = modules, mesh, list(plan.stage_ids), plan.n_stages
        self.group = mesh.pp_group()  # this rank's pipeline process group (None: the default group)
        layout = plan.layout or {mesh.pp_rank: list(plan.stage_ids)}  # {pipeline rank: its stage ids}
        self.stage_owner = {s: r for r, ids in layout.items() for s in ids}  # stage -> the pipeline rank holding it
        self.local = torch.nn.ModuleList(modules)
        super().__init__(model, optimizer, ctx.make_scheduler(optimizer), ctx.dist, ctx.device,
                         ctx.cfg.optim.grad_clip, ctx.amp)  # fmt: skip
        self._synced = -1  # the plain model is on meta on every rank: the first full_model() fills rank 0's
        self.stages = [PipelineStage(m, s, self.n_stages, self.device, group=self.group)
                       for m, s in zip(modules, self.stage_ids)]  # fmt: skip
        for stage in self.stages:
            keep_moe_counts_through_inference(stage)
        if mesh.dp == 1 and p.pp_schedule in ("1f1b", "interleaved1f1b"):
            for m in modules:
                keep_resharding_after_backward(m)
        n_microbatches = p.pp_microbatches or 2 * mesh.pp
        self.schedule = build_schedule(p.pp_schedule, self.stages, n_microbatches, stage_loss, p.pp_schedule_csv)
        self.overlap = None
        if p.pp_schedule == "dualpipev" and p.pp_overlap:  # our OVERLAP_F_B: forward and backward overlap on CUDA
            self.overlap = install_overlap(self.schedule, modules, self.device, interleave_a2a=p.ep > 1)
        self.first = any(st.is_first for st in self.stages)
        self.last = any(st.is_last for st in self.stages)

    def describe(self) -> str:
        held = sum(local(p).numel() for p in self.train_parameters())
        total = sum(p.numel() for p in self.model.parameters())
        ids = [st.stage_index for st in self.stages]
        hsdp = f", HSDP {self.mesh.dp_replicate} x {self.mesh.dp_shard}" if self.mesh.dp_replicate > 1 else ""
        ep = f", the experts over ep={self.mesh.ep}" if self.mesh.ep > 1 else ""  # expert parallelism in the stages
        dp = f" x dp={self.mesh.dp} (FSDP2 per stage{hsdp}{ep})" if self.mesh.dp > 1 else ""
        tp = f" x tp={self.mesh.tp}" if self.mesh.tp > 1 else ""
        return (
            f"pipeline: pp={self.mesh.pp}{tp}{dp}; rank {self.dist.rank} runs stages {ids} and holds {held:,} of "
            f"{total:,} parameter elements"
        )

    def train_parameters(self):
        return self.local.parameters()

    def param_names(self) -> dict:
        """Local parameters -> their names in the plain model (stages keep the original names)."""
        return {p: n for m in self.modules for n, p in m.named_parameters()}

    def forward_backward(self, batch) -> torch.Tensor:
        """Forward and backward of this replica's slice through the schedule; returns the global mean loss on every
        rank (the last-stage ranks hold one replica's mean each)."""
        x, y = batch(0, self.mesh.dp_rank, self.mesh.dp)
        losses: list = []
        x, y = self.to_device(x), self.to_device(y)
        # the last stage takes the targets as a keyword (its forward returns the chunked loss); a first stage on the
        # same rank (ZBV, DualPipeV, one rank) gets them too and passes its stream on (`Transformer.forward`)
        last = dict(target=y, losses=losses, targets=y, return_outputs=False)
        with self.autocast():  # the stages' forwards run under it (the backward follows the forward's dtypes)
            if self.first and self.last:
                self.schedule.step(x, **last)
            elif self.first:
                self.schedule.step(x)
            elif self.last:
                self.schedule.step(**last)
            else:
                self.schedule.step()
        if self.overlap is not None:
            self.overlap.finish()
        self.replicated = sync_replicated_grads(self.modules)  # FSDP's recompute layout (fsdp.py note 1)
        for m in self.modules:  # expert parallelism: the experts served every data-parallel rank of the stage
            scale_expert_grads(m, self.mesh.dp)
        if self.mesh.tp > 1:  # the sites' and the norms' gradients, each tp rank's from its slice of the sequence
            for m in self.modules:
                sum_site_grads(m, self.mesh.tp_mesh())
                match_grad_placements(m)
        mine = torch.stack(losses).detach().float().mean() if losses else torch.zeros((), device=self.device)
        # the last stage's ranks of each replica (its tp ranks: the same loss) hold one replica's mean each
        return reduce_sum(mine, self.dist, self.device) / (self.mesh.dp * self.mesh.tp)

    def report(self) -> str:
        """What the overlapped F/B pairs did so far on this rank (empty without our OVERLAP_F_B)."""
        if self.overlap is None:
            return ""
        o = self.overlap
        where = "F and B on two streams, FFN post_res on a priority -1 stream" if o.cuda else "in order (CPU)"
        if o.interleave_a2a and not o.cuda:
            where = "interleaved at the expert all-to-alls, one half at a time (CPU)"
        split = sum(f != b for *_, f, _, _, b in o.trace)
        a2a = ""
        if o.interleave_a2a:  # expert parallelism: the all-to-alls of each half behind the other's compute
            hidden, posted = hidden_all_to_alls(o.a2a_events)
            a2a = f"; {hidden} of {posted} expert all-to-alls posted before the other half's compute and waited after"
        return (
            f"OVERLAP_F_B: {o.pairs} overlapped F/B pairs, {o.runner.calls} FFN post_res through the priority "
            f"runner, {split} of the first {len(o.trace)} pairs with F and B on different streams, {o.early_sends} "
            f"boundary sends posted before the pair's backward; {where}; issue order: {issue_order(o.events)}{a2a}"
        )

    def clip(self) -> torch.Tensor:
        """The global pre-clip norm over every stage and shard (one all-reduce), and the clip applied on the device
        (a factor min(1, limit / norm): no host read of the norm)."""
        replicated = getattr(self, "replicated", ())

        def copies(p):  # a replicated gradient sits whole on each of its dp ranks, a shard on each of its
            # dp_replicate ranks (HSDP); every rank of a stage holds tp_copies of it: each counted once
            return (self.mesh.dp if p in replicated else self.mesh.dp_replicate) * tp_copies(p, self.mesh.tp)

        return clip_grads(self.params_with_grad(), self.grad_clip, self.dist, self.device, copies)

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean loss over `batches`, evaluated through the stages where they live (no rank holds the whole model):
        each data-parallel replica takes its slice of every batch through its pipeline stage by stage, the stream
        state [B, T, n, C] crossing ranks point to point on the compute device, and the last stage's loss sums are
        reduced once. A collective: every rank calls it."""
        me, owner = self.mesh.pp_rank, self.stage_owner
        module_of = dict(zip(self.stage_ids, self.modules))
        last = self.n_stages - 1
        stream_dtype = self.model.stream_dtype or torch.float32
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for m in self.modules:
            m.eval()
        for x, y in batches:
            per = x.shape[0] // self.mesh.dp
            rows = slice(self.mesh.dp_rank * per, (self.mesh.dp_rank + 1) * per)
            x, y = self.to_device(x[rows]), self.to_device(y[rows])
            state_shape = (x.shape[0], x.shape[1] // self.mesh.tp, self.model.conn.n_streams, self.model.cfg.dim)
            h = x
            for s in range(self.n_stages):
                if owner[s] != me:
                    continue
                if s > 0 and owner[s - 1] != me:  # the previous stage lives on another rank
                    h = recv_from(state_shape, stream_dtype, self.device, owner[s - 1], self.group)
                with self.autocast():  # the last stage returns its (chunked) loss
                    h = module_of[s](h, y) if s == last else module_of[s](h)
                if s == last:
                    total += h.double()
                elif owner[s + 1] != me:  # sent in the stream dtype (model.stream_dtype), which the receiver knows
                    send_to(h.to(stream_dtype), owner[s + 1], self.group)
        for m in self.modules:
            m.train()
        reshard_all(self.modules)  # FSDP2 per stage (dp > 1): back to the shards the optimizer steps
        return sum_across_ranks(total, self.dist, self.device) / (self.mesh.dp * self.mesh.tp * len(batches))

    def site_statistics(self, tokens: torch.Tensor, new_probe) -> dict | None:
        """The diagnostics through the stages where they live, like `evaluate`: every data-parallel replica takes the
        whole batch (its FSDP2 hooks gather a stage's weights; a few rows do not split over the replicas) through its
        pipeline, each stage's probe computing its own sites, the stream state and the forward composite
        H_l ... H_1 [B, T, n, n] (float64) crossing each boundary forward, then the backward composite H_L ... H_l
        crossing back. Only the per-site dicts travel to rank 0. A collective: every rank calls it."""
        me, owner, last = self.mesh.pp_rank, self.stage_owner, self.n_stages - 1
        module_of = dict(zip(self.stage_ids, self.modules))
        stream_dtype = self.model.stream_dtype or torch.float32
        x = self.to_device(tokens)
        n, k = self.model.conn.n_streams, self.model.conn_cfg.n_streams  # state rows; H_res is k x k (single-pass: n-1)
        # sequence parallel (tp > 1): this rank's [B, T/tp, n, C] slice crosses; the probes gather the coefficients
        state_shape, comp_shape = (x.shape[0], x.shape[1] // self.mesh.tp, n, self.model.cfg.dim), (*x.shape, k, k)
        probes, h, prefix = {}, x, None
        try:
            for s in [s for s in range(self.n_stages) if owner[s] == me]:
                if s > 0 and owner[s - 1] != me:  # the previous stage lives on another rank
                    h = recv_from(state_shape, stream_dtype, self.device, owner[s - 1], self.group)
                    prefix = recv_from(comp_shape, torch.float64, self.device, owner[s - 1], self.group)
                probes[s] = new_probe()
                if self.mesh.tp > 1:
                    probes[s].whole_tokens = lambda c: gather_tokens(c.contiguous(), self.mesh.tp_mesh())
                with probes[s].capture(module_of[s]), plain_blocks(module_of[s]), self.autocast():
                    h = module_of[s](h)
                prefix = probes[s].forward(prefix)
                if s < last and owner[s + 1] != me:
                    send_to(h.to(stream_dtype), owner[s + 1], self.group)
                    send_to(prefix, owner[s + 1], self.group)
        finally:
            reshard_all(self.modules)
        suffix = None
        for s in sorted(probes, reverse=True):
            if s < last and owner[s + 1] != me:
                suffix = recv_from(comp_shape, torch.float64, self.device, owner[s + 1], self.group)
            suffix = probes[s].backward(suffix)
            if s > 0 and owner[s - 1] != me:
                send_to(suffix, owner[s - 1], self.group)
        mine = {name: stats for probe in probes.values() for name, stats in probe.sites.items()}
        merged = gather_dicts(mine, self.dist)  # every replica computed the same values: any one's will do
        return {name: merged[name] for name, _ in self.model.sites()} if self.dist.is_main else None

    def _sync_full_model(self) -> None:
        """Rank 0's `model` gets every stage's current weights (for file checkpoints and export), streamed tensor by
        tensor: each stage's data-parallel ranks all-gather one tensor at a time (FSDP), and the stage's source rank
        (its pipeline rank's first rank: dp, tp and cp coordinates 0) sends it to rank 0, which copies it into its
        plain model on the host (`host_state`) and drops it. No message and no buffer on rank 0 is larger than one
        tensor beyond the plain model itself; the other ranks' plain model stays on meta. Every rank walks the stages
        in increasing order (the names from the plain model's own cut, the same on every rank), so the gathers of a
        stage's group and the sends to rank 0 never wait on each other in a cycle."""
        target = host_state(self.model) if self.dist.is_main else None
        per_pp_rank = self.dist.world // self.mesh.pp  # rank = pp_rank * per_pp_rank + (dp, cp, tp coordinates)
        module_of = dict(zip(self.stage_ids, self.modules))
        for s in range(self.n_stages):
            names = cut_stage(self.model, s, self.n_stages).state_dict()  # meta on every rank but 0: shapes only
            source = self.stage_owner[s] * per_pp_rank
            if s in module_of:
                live = module_of[s].state_dict()
                for k in names:
                    whole = full(live[k]).detach()  # a collective over the stage's data-parallel ranks
                    if target is not None:
                        target[k].copy_(whole)
                    elif self.dist.rank == source:
                        send_to(whole, 0)
            elif target is not None:
                for k, t in names.items():
                    target[k].copy_(recv_from(t.shape, t.dtype, self.device, source).cpu())

    def gather_grads(self) -> dict:
        """Every stage's current gradients by parameter name, merged on rank 0 ({} elsewhere). A collective."""
        grads = {n: full(p.grad).detach().cpu().clone() for p, n in self.param_names().items() if p.grad is not None}
        return gather_dicts(grads, self.dist)

    def live_modules(self):
        return self.modules

    def optimizer_state(self) -> dict:
        """Every rank's optimizer state by parameter name, merged on rank 0: loads into any layout."""
        mine = super().optimizer_state()
        merged = gather_dicts(mine["state"], self.dist)
        return {"state": merged, "groups": mine["groups"]} if self.dist.is_main else {}
