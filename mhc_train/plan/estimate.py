"""`make_plan(cfg, world)`: per-GPU memory of a run, in GiB, before it is launched (`mhc-train plan`).

Per rank: parameters, gradients and optimizer states from the real sharded layout (layout.py), activations from a
fake-tensor trace of one micro-batch (activations.py) times the micro-batches the schedule keeps in flight, and
buffers (communication buckets, FSDP gathers in flight, autocast weight copies, pipeline receive buffers). "Per GPU"
is the largest rank's figure: rank 0 without a pipeline, else every pipeline rank (the first of each stage's
data-parallel group) is planned and the largest kept.

Assumptions (see README "Sizing a run"):
1. Precision as `parallel.build.autocast_dtype` picks it for `train.device` (auto: CUDA, bf16 autocast); fp32
   master parameters; AdamW keeps 2 fp32 states per parameter it steps; gradients in the parameters' dtype.
2. Micro-batches in flight, per rank r of pp: 1F1B min(pp - r, m); interleaved 1F1B (v chunks per rank) torch's
   warm-up min(m v, (v - 1) pp + 2 (pp - 1 - r)) + 1 chunks; ZBV min(pp, m) and DualPipeV min(pp + 1, m) micro-batches
   of both V stages; a CSV schedule as 1F1B over all its local stages. One micro-batch without a pipeline. The
   pipelining runtime's receive buffers (one per micro-batch and direction) and the last stage's logits of every
   micro-batch (the schedule's merged output) are buffers.
3. FSDP2: the root unit (embedding, head) stays gathered from forward to backward; two block units are gathered at
   once (the current one and the prefetched one) and one unit's unsharded gradient is reduced in fp32. With one
   unit for the whole model (recompute today, split-backward schedules) that unit is the whole model.
4. DDP: gradient buckets are a second fp32 copy of the gradients (`gradient_as_bucket_view` off). DeepSpeed (fp32
   mode): stage 1-2 whole fp32 parameters, an fp32 master partition next to Adam's two states, gradients whole
   (stage 1) or partitioned (2-3), reduce and all-gather buckets of 5e8 elements each (its defaults, or the
   `parallel.deepspeed_config` JSON's), stage 3 a prefetch bucket of 5e7 and two gathered blocks.
5. `total` is the sum of the terms, except where gradients appear only during the step's one backward (no pipeline,
   `train.grad_accum=1`): there they fill memory the backward frees, and `total` has the traced peak of activations
   plus gradients (whole gradients: one process, DDP, ZeRO-1), or the larger of activations and gradients (sharded),
   on top of the other terms. FSDP's block gathers and unsharded gradients count where they exceed what the
   backward has freed of the head's activations by then.
6. Tensor parallelism (`parallel.tp`): the data-parallel ranks are world / tp, so each rank's micro-batch is
   batch / (world / tp); activations are the tp = 1 trace divided by tp plus each sub-layer's all-gathered input
   (`tp_activations`); parameters, gradients and optimizer states from the real 2-D layout.
"""

from __future__ import annotations

import json

import torch

from mhc_train.config import Config
from mhc_train.config.validate import validate_world
from mhc_train.plan.activations import trace_stage
from mhc_train.plan.layout import Layout, rank_layout

GIB = 2**30
KEYS = ("params", "grads", "optimizer", "activations", "buffers", "total")


def target_amp(cfg: Config):
    """The autocast dtype the run will use on its `train.device` (auto: a GPU)."""
    t = cfg.train
    return torch.bfloat16 if t.precision == "bf16" or (t.precision == "auto" and t.device != "cpu") else None


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def in_flight(cfg: Config, lay: Layout, m: int, pp_rank: int) -> int:
    """Stage-forwards whose activations one pipeline rank holds at its peak (assumption 2), in units of one of its
    stages (all of its stages for the V schedules, counted per stage)."""
    s, pp, n_local = cfg.parallel.pp_schedule, lay.pp, len(lay.stage_ids)
    if s == "1f1b":
        return min(pp - pp_rank, m)
    if s == "interleaved1f1b":
        return min(m * n_local, (n_local - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)
    if s in ("zbv", "dualpipev"):
        return n_local * min(pp + (s == "dualpipev"), m)
    return n_local * min(pp, m)


def _deepspeed_settings(cfg: Config) -> dict:
    """The bucket sizes the engine will run with: DeepSpeed's defaults, then `parallel.zero` (as the engine builds its
    section, on CUDA), then the user's JSON over both."""
    from mhc_train.parallel.data_parallel import zero_optimization

    zero = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}
    zero.update(zero_optimization(cfg.parallel.zero_stage, cfg.parallel.zero, "cuda"))
    if cfg.parallel.deepspeed_config:
        with open(cfg.parallel.deepspeed_config) as f:
            zero.update(json.load(f).get("zero_optimization", {}))
    return zero


def _buffers(cfg: Config, lay: Layout, amp, copies: float, boundary: float, tr) -> float:
    """Bytes outside params/grads/optimizer/activations (assumptions 3, 4): gathers, buckets, weight copies. `tr`:
    the stage trace, for FSDP's backward (gathers and unsharded gradients while the head's activations are gone)."""
    if lay.engine == "ddp":
        return lay.held_numel * 4 + copies
    if lay.engine == "deepspeed":
        z, stage = _deepspeed_settings(cfg), cfg.parallel.zero_stage
        block = (lay.total_numel / max(lay.layers, 1)) * 4
        extra = z["stage3_prefetch_bucket_size"] * 4 + 2 * block if stage == 3 else z["allgather_bucket_size"] * 4
        return z["reduce_bucket_size"] * 4 + extra + copies
    if lay.units:  # FSDP2, alone or per pipeline stage; the root unit comes first
        (root_n, root_d), blocks = lay.units[0], sorted(lay.units[1:], key=lambda u: -u[0] * _bytes(u[1]))
        root = root_n * _bytes(root_d) + (0 if any(d != torch.float32 for _, d in lay.units) else copies)
        # in the backward: two block units gathered, one block's and the root's unsharded gradients (fp32 reduce),
        # where the head's activations are already freed
        backward = sum(n * _bytes(d) for n, d in blocks[:2]) + (blocks[0][0] * 4 if blocks else 0) + root_n * 4
        return root + max(0.0, tr.blocks_end + backward - tr.peak) + boundary
    return copies + boundary


def rank_memory(cfg: Config, world: int, rank: int, pp_rank: int = 0) -> tuple[dict, Layout]:
    """Bytes one rank holds at its peak, by term (module docstring), and its layout."""
    amp = target_amp(cfg)
    lay = rank_layout(cfg, world, rank, amp)
    p, t, P = cfg.parallel, cfg.train, lay.held_numel
    pb = _bytes(lay.param_dtype)
    if lay.engine == "deepspeed":
        part = -(-lay.total_numel // world)
        grads = (lay.total_numel if p.zero_stage == 1 else part) * 4
        optimizer = part * (8 + 4)  # Adam's two fp32 states + the fp32 master partition
    else:
        grads = P * pb
        optimizer = P * 8 + (P * 4 if lay.param_dtype != torch.float32 else 0)
    if lay.engine == "pipeline":
        m = p.pp_microbatches or 2 * p.pp
        micro = t.batch_size // (lay.dp * m)
        per_stage = max(1, lay.layers // len(lay.stage_ids))
        n_stages = lay.n_stages
        traces = [trace_stage(cfg, per_stage, micro, s == 0, s == n_stages - 1, amp) for s in lay.stage_ids]
        k = in_flight(cfg, lay, m, pp_rank)
        saved = sum(tr.saved for tr in traces) / len(traces)
        saved_copies = sum(tr.saved_copies for tr in traces) / len(traces)
        worst = max(traces, key=lambda tr: tr.peak)
        acts = (k - 1) * tp_activations(cfg, saved, micro, amp, per_stage) + tp_activations(
            cfg, worst.peak, micro, amp, per_stage
        )
        copies = (k - 1) * saved_copies + worst.peak_copies
        boundary = _pipeline_buffers(cfg, lay, m, micro)
    else:
        micro = max(1, t.batch_size // (world // p.tp))  # the tp ranks of a data-parallel group share a batch
        tr = trace_stage(cfg, cfg.model.n_layer, micro, True, True, amp)
        acts, copies, boundary = tp_activations(cfg, tr.peak, micro, amp), tr.peak_copies, 0.0
    terms = {"params": P * pb, "grads": grads, "optimizer": optimizer, "activations": acts}
    terms["buffers"] = _buffers(cfg, lay, amp, copies, boundary, worst if lay.engine == "pipeline" else tr)
    terms["total"] = sum(terms.values())
    if _grads_replace_activations(cfg, lay):  # assumption 5
        whole = lay.engine in ("none", "ddp") or p.zero_stage == 1
        terms["total"] -= grads + acts - max(tr.peak_with_grads if whole else acts, grads)
    return terms, lay


def tp_activations(cfg: Config, traced: float, micro: int, amp, layers: int | None = None) -> float:
    """Assumption 6: a rank's activations under tensor + sequence parallelism, from the tp = 1 trace: everything
    divides by tp (the stream state and the norms along T, heads and the FFN width, the logits along V), except each
    sub-layer's all-gathered input [micro, T, C], which the column-parallel GEMMs keep whole for their backward.
    `layers`: the blocks the trace covers (a pipeline stage's; default the whole model's)."""
    tp = cfg.parallel.tp
    if tp == 1:
        return traced
    gathered = (
        2 * (layers or cfg.model.n_layer) * micro * cfg.train.seq_len * cfg.model.dim * _bytes(amp or torch.float32)
    )
    return traced / tp + gathered * (1 - 1 / tp)


def _pipeline_buffers(cfg: Config, lay: Layout, m: int, micro: int) -> float:
    """torch.distributed.pipelining's per-micro-batch buffers, kept across steps: a receive buffer for each
    micro-batch's input (every stage but the first) and for its output gradient (every stage but the last), each
    `[micro, T, n, C]`. The last stage returns each micro-batch's chunked loss, a scalar, not its logits (the chunks'
    logits are transient, in the traced activations). Under tensor parallelism the buffers are 1/tp (the stream's
    [micro, T/tp, n, C] slice crosses)."""
    t, tp = cfg.train, cfg.parallel.tp
    stream = 2 if cfg.model.stream_dtype == "bf16" else 4
    per = micro * t.seq_len * cfg.connection.n_streams * cfg.model.dim * stream / tp
    total = 0.0
    for s in lay.stage_ids:
        total += m * per * ((s != 0) + (s != lay.n_stages - 1))
    return total


def _grads_replace_activations(cfg: Config, lay: Layout) -> bool:
    """Gradients that exist only from the backward of the step's one micro-batch on (set to None after each step):
    every engine but the pipeline (gradients kept across its micro-batches) with `train.grad_accum=1`."""
    return lay.engine != "pipeline" and cfg.train.grad_accum == 1


def plan_ranks(cfg: Config, world: int) -> list[tuple[int, int]]:
    """(rank, pipeline rank) of every distinct role: rank 0, or the first rank of each pipeline stage group."""
    if cfg.parallel.pp == 1:
        return [(0, 0)]
    dp = world // cfg.parallel.pp
    return [(r * dp, r) for r in range(cfg.parallel.pp)]


def describe(cfg: Config, lay: Layout, world: int, rank: int) -> str:
    share = f"rank {rank} holds {lay.held_numel:,} of {lay.total_numel:,} parameter elements"
    p = cfg.parallel
    if lay.engine == "pipeline":
        ep = f", the experts over ep={p.ep}" if p.ep > 1 else ""  # expert parallelism inside the stages
        dp = f" x dp={lay.dp} (FSDP2 per stage{ep})" if lay.dp > 1 else ""
        dp = (f" x tp={p.tp}" if p.tp > 1 else "") + dp
        head = f"pipeline {p.pp_schedule}: pp={lay.pp}{dp}; rank {rank} runs stages {lay.stage_ids}"
        return f"{head}; holds {lay.held_numel:,} of {lay.total_numel:,} parameter elements"
    if lay.engine == "fsdp":
        kind = "one unit" if len(lay.units) == 1 else f"{len(lay.units)} units"
        tp = f"tp={p.tp} x " if p.tp > 1 else ""
        return f"{tp}fsdp: {world} ranks ({kind}{_experts(cfg, lay)}); {share}"
    if lay.engine == "deepspeed":
        return f"deepspeed ZeRO-{p.zero_stage}: {world} ranks; {share} ({lay.notes[0]})"
    return f"{lay.engine}: {world} ranks; {share}"


def _experts(cfg: Config, lay: Layout) -> str:
    """Where the routed experts live under expert parallelism, as a clause of `describe` ("" without it)."""
    p, moe = cfg.parallel, cfg.model.moe
    if p.ep == 1:
        return ""
    rest = f", FSDP over dp/ep={lay.dp // p.ep}" if lay.dp > p.ep else ""
    return f", ep={p.ep}: {moe.n_routed_experts // p.ep} of {moe.n_routed_experts} experts per expert group rank{rest}"


def make_plan(cfg: Config, world: int, device_gib: float = 80.0) -> dict:
    """The plan as `mhc-train plan --json` prints it: per-GPU GiB of the largest rank, `fits`, `world`, `engine`."""
    validate_world(cfg, world)
    worst = None
    for rank, pp_rank in plan_ranks(cfg, world):
        terms, lay = rank_memory(cfg, world, rank, pp_rank)
        if worst is None or terms["total"] > worst[0]["total"]:
            worst = (terms, lay, rank)
    terms, lay, rank = worst
    per_gpu = {k: round(terms[k] / GIB, 3) for k in KEYS}
    return {
        "per_gpu_gib": per_gpu,
        "fits": bool(terms["total"] / GIB <= device_gib),
        "world": world,
        "engine": describe(cfg, lay, world, rank),
        "device_gib": device_gib,
        "rank": rank,
        "bytes": {k: int(v) for k, v in terms.items()},
        "notes": lay.notes,
    }


def format_plan(plan: dict) -> str:
    """The human-readable plan: one line per term, the verdict, the engine and the notes."""
    g = plan["per_gpu_gib"]
    lines = [f"per GPU (the largest rank, rank {plan['rank']}) at world {plan['world']}:"]
    lines += [f"  {k:<12}{g[k]:>9.2f} GiB" for k in KEYS]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {plan['device_gib']:g} GiB per GPU")
    lines.append(f"engine: {plan['engine']}")
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
