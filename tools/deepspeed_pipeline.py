"""The same model on DeepSpeed's own pipeline engine (`PipelineModule`, 1F1B): an independent oracle for ours.

DeepSpeed's pipeline runtime shares no code with torch.distributed.pipelining (its own schedule, its own p2p, its
own gradient accumulation), so a run that reaches the same losses as `parallel.pp_schedule=1f1b` checks our stage
cuts, the `[B, T, n, C]` hand-off and the loss/gradient scaling from outside. `scripts/deepspeed_pipeline_oracle.py`
runs it from the same YAML; tests compare the two.

The layer list is: embedding + expand into n streams, one entry per block, collapse + final norm + head. Parameters
are the plain model's own (built with the same seed), and the optimizer and LR schedule are the trainer's, so the
two runs differ only in the pipeline machinery. Not a training engine: no checkpoints, no evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.model import lm_loss


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.tok_embeddings, self.conn = model.tok_embeddings, model.conn

    def forward(self, tokens):
        return self.conn.expand(self.tok_embeddings(tokens))  # [B, T, n, C]


class _Block(nn.Module):
    def __init__(self, layer, rope):
        super().__init__()
        self.layer = layer
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, x):
        return self.layer(x, self.rope)


class _Head(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.norm, self.output, self.conn = model.norm, model.output, model.conn

    def forward(self, x):
        return self.output(self.norm(self.conn.collapse(x)))


def pipeline_module(model, num_stages: int):
    """A DeepSpeed `PipelineModule` over `model`'s own modules, cut into `num_stages` by layer count."""
    from deepspeed.pipe import PipelineModule

    layers = [_Embed(model), *(_Block(b, model.rope) for b in model.layers.values()), _Head(model)]
    return PipelineModule(layers=layers, num_stages=num_stages, loss_fn=lm_loss, partition_method="uniform")


def train_losses(cfg, steps: int, log=print) -> tuple[list[float], list[float]]:
    """Train `steps` steps of `cfg` on DeepSpeed's pipeline engine (launched world = parallel.pp ranks, 1F1B over
    parallel.pp_microbatches micro-batches); returns each step's loss and pre-clip gradient norm (every rank)."""
    import deepspeed

    from mhc_train.data.loader import TokenData
    from mhc_train.model import build_model
    from mhc_train.optim import build_optimizer, build_scheduler

    t, p = cfg.train, cfg.parallel
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    model = build_model(cfg.model, cfg.connection, seed=t.seed)
    optimizer = build_optimizer(model, cfg.optim)  # named groups from the plain model; the modules are shared
    scheduler = build_scheduler(optimizer, t.max_steps, cfg.schedule)
    m = p.pp_microbatches or 2 * p.pp
    config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // m,
        "gradient_accumulation_steps": m,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=pipeline_module(model, p.pp), optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    # Record the true global gradient norm before DeepSpeed clips. Its fp32 pipeline path drops the norm it computes,
    # and that norm is not the global one: each stage's local norm, then averaged over ranks (deepspeed 0.19.8,
    # runtime/utils.py clip_grad_norm_), so DeepSpeed clips differently from one process once clipping is active.
    ds_clip = engine.clip_fp32_gradients

    def norm_then_clip():
        sq = sum(
            (q.grad.detach().double().square().sum() for q in engine.module.parameters() if q.grad is not None),
            torch.zeros((), dtype=torch.float64),
        )
        torch.distributed.all_reduce(sq, group=engine.grid.get_pipe_parallel_group())
        engine._global_grad_norm = sq.sqrt().item()
        ds_clip()

    engine.clip_fp32_gradients = norm_then_clip
    data = TokenData.for_config(cfg.data)
    losses, norms = [], []
    for step in range(steps):
        x, y = data.train_batch(t.seed, step, 0, t.batch_size, t.seq_len)
        micro = iter(zip(x.chunk(m), y.chunk(m)))  # the same split torch.distributed.pipelining makes
        losses.append(engine.train_batch(data_iter=micro).item())
        norm = engine.get_global_grad_norm()
        norms.append(float(norm) if norm is not None else float("nan"))
        log(f"deepspeed pipeline step {step + 1}: loss {losses[-1]:.6f}, grad norm {norms[-1]:.6f}")
    return losses, norms
