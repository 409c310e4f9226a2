"""Activation memory of one rank, from tracing one micro-batch at the real shape on fake tensors.

`trace_stage` builds a slice of the model (the layers one recompute block pattern needs, with the embedding and the
head where this rank holds them) under `FakeTensorMode`, applies the configured recompute, and runs forward and
backward of one micro-batch of `[micro_batch, seq_len]` tokens under autocast (bf16 precision) inside `LiveBytes`:
every storage an op returns is counted, deduplicated by storage, freed when it dies. No data is read and nothing is
allocated: fake tensors carry shapes only.

From the trace:
- `saved`: bytes live at the end of the forward (everything kept for backward, logits and the fp32 CE input
  included), as `embed + layers * per_layer + head`, the per-layer term measured over whole recompute blocks;
- `peak`: the most live at once during forward + backward (the recomputed block, the logits' gradient), extended to
  the rank's layers by the same per-layer term;
- `peak_with_grads`: the same peak counting the gradients accumulated so far (they replace freed activations
  during the backward of the last micro-batch);
- `weight_copies`: autocast's bf16 copies of fp32 weights (kept for backward), reported as buffers, not activations.

Parameter gradients are marked as they are accumulated and kept apart (the grads term is sized from the layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mhc_train.config import Config
from mhc_train.plan.live import LiveBytes


@dataclass
class StageTrace:
    """Bytes of one micro-batch on one rank's layers (extended from the traced slice)."""

    saved: float  # live at the end of the forward, activations only
    peak: float  # most live during forward + backward, activations only
    saved_copies: float  # autocast weight copies live at the end of the forward
    peak_copies: float  # autocast weight copies live at the peak
    peak_with_grads: float = 0.0  # most live during backward counting this rank's gradients too (copies excluded)
    blocks_end: float = 0.0  # live when the backward reaches the blocks (the head's activations freed)


def block_sites(cfg: Config, layers: int) -> int:
    """Sites per recompute block on a rank running `layers` blocks (2 sites each); 1 layer's worth without."""
    from mhc_train.parallel import plan_blocks

    if cfg.parallel.recompute == "none":
        return 2
    block = cfg.parallel.recompute_block
    block = block if block in ("auto", "stage") else int(block)
    plan = plan_blocks(2 * layers, cfg.connection.n_streams if cfg.connection.type != "residual" else 1, block)
    return plan[0][1] - plan[0][0]


def _slice_model(cfg: Config, layers: int, first: bool, last: bool, sites: int):
    from dataclasses import replace

    from mhc_train.model.transformer import Transformer
    from mhc_train.parallel import apply_recompute

    model = Transformer(replace(cfg.model, n_layer=layers), cfg.connection)
    apply_recompute(model, cfg.parallel.recompute, sites)
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm, model.output = None, None
    return model


def trace_stage(cfg: Config, layers: int, micro_batch: int, first: bool, last: bool, amp) -> StageTrace:
    """One micro-batch through a rank's `layers` blocks (see the module docstring). `amp`: autocast dtype or None.
    Recompute blocks shorter than the stage: a slice of 2 whole blocks, extended by its per-layer bytes. One block
    for the whole stage (`recompute_block=stage`): slices of 1 and 2 layers, each one block, extended linearly."""
    sites = block_sites(cfg, layers)
    if sites < 2 * layers or layers <= 2:
        traced = max(1, min(layers, sites))  # 2 whole recompute blocks (2 * sites sites), or the whole stage
        return _extend(_trace(cfg, traced, micro_batch, first, last, amp, sites), layers - traced)
    one = _trace(cfg, 1, micro_batch, first, last, amp, 2)
    two = _trace(cfg, 2, micro_batch, first, last, amp, 4)
    step = [b - a for a, b in zip(one, two)]
    return StageTrace(*[v + (layers - 2) * d for v, d in zip(two[:6], step)])


def _extend(raw: tuple, extra: int) -> StageTrace:
    saved, peak, saved_copies, peak_copies, with_grads, blocks_end, per_layer, per_layer_copies = raw
    acts = extra * (per_layer - per_layer_copies)
    return StageTrace(saved + acts, peak + acts, saved_copies + extra * per_layer_copies,
                      peak_copies + extra * per_layer_copies, with_grads + acts, blocks_end + acts)  # fmt: skip


def _trace(cfg: Config, traced: int, micro_batch: int, first: bool, last: bool, amp, sites: int) -> tuple:
    """(saved, peak, saved copies, peak copies, per-layer bytes, per-layer copies) of a `traced`-layer slice."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mhc_train.model.transformer import lm_loss

    B, T, m = micro_batch, cfg.train.seq_len, cfg.model
    stream = torch.bfloat16 if m.stream_dtype == "bf16" else torch.float32
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _slice_model(cfg, traced, first, last, sites)
        weights = {id(p) for p in model.parameters()}
        copy_op = torch.ops.aten._to_copy.default
        n = model.n_streams
        with LiveBytes(tag=lambda f, a, out: f is copy_op and id(a[0]) in weights, exclude=model.parameters()) as mode:
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(lambda q: mode.mark_grad(q.grad))
            autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
            if first:
                tokens = torch.randint(0, m.vocab_size, (B, T))
                with autocast:
                    h = model.embed(tokens)
            else:
                h = torch.randn(B, T, n, m.dim, dtype=stream, requires_grad=True)
            a = (mode.live, mode.tagged)
            with autocast:
                h = model.run_blocks(h)
            b = (mode.live, mode.tagged)
            if last:
                with autocast:
                    logits = model.head(h)
                out = lm_loss(logits, torch.randint(0, m.vocab_size, (B, T)))
                del logits, h
                grad = None
            else:
                with autocast:
                    out = model.head(h)
                del h
                grad = torch.ones_like(out)  # the gradient the next stage sends back
            c = (mode.live, mode.tagged)
            out.backward(grad)
            del out, grad
    per_layer, per_layer_copies = (b[0] - a[0]) / traced, (b[1] - a[1]) / traced
    peak = mode.peak_no_grads - mode.tagged_at_peak_no_grads
    raw = (c[0] - c[1], peak, c[1], mode.tagged_at_peak_no_grads, mode.peak - mode.tagged_at_peak, b[0] - b[1])
    return (*raw, per_layer, per_layer_copies)
