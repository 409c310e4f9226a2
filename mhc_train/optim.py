"""AdamW with weight-decay groups, and the learning-rate schedules (warm-up, then cosine, step, constant or wsd).

- wsd (warmup-stable-decay): the multiplier is a function of the step and the config alone, and nothing of the decay is
  kept in a checkpoint (LambdaLR saves its position, not its function): a checkpoint of the constant stage resumed
  with `schedule.decay_start` at its step (and `train.max_steps` at the cooldown's end) cools down from there, and the
  same checkpoint serves any other cooldown.
- `optim.connection_warmup_steps` W > 0: the connection groups (`conn_*`) get their own LambdaLR function, the main
  multiplier times min(1, (step + 1) / W) (the main warm-up's convention). A function of the step alone, so resume
  is exact (`checkpoint/resume.apply_hyperparameters` re-evaluates each group's function). W = 0 builds the same one
  function as before.
"""

from __future__ import annotations

import math

import torch

from mhc_train.config import OptimConfig, ScheduleConfig
from mhc_train.model import no_weight_decay


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Two groups: matrices decay; norms, biases, gates, scalars and HC static parts (`no_weight_decay`) do not.

    With `connection_lr_mult != 1` or `connection_weight_decay: false`, the connection parameters (every name with
    `_conn.`: mHC phi / alpha / bias, HC static and dynamic parts) get groups of their own, `conn_decay` and
    `conn_no_decay`, at `lr * connection_lr_mult` (0 freezes them); so does `connection_warmup_steps > 0`."""
    own_groups = cfg.connection_lr_mult != 1.0 or not cfg.connection_weight_decay or cfg.connection_warmup_steps > 0
    buckets: dict[str, list] = {"decay": [], "no_decay": [], "conn_decay": [], "conn_no_decay": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "no_decay" if no_weight_decay(name, p) else "decay"
            buckets[f"conn_{kind}" if own_groups and "_conn." in name else kind].append(p)
    conn_wd = cfg.weight_decay if cfg.connection_weight_decay else 0.0
    groups = [
        {"params": buckets["decay"], "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": buckets["no_decay"], "weight_decay": 0.0, "name": "no_decay"},
    ]
    if own_groups:
        conn_lr = cfg.lr * cfg.connection_lr_mult
        groups += [
            {"params": buckets["conn_decay"], "weight_decay": conn_wd, "lr": conn_lr, "name": "conn_decay"},
            {"params": buckets["conn_no_decay"], "weight_decay": 0.0, "lr": conn_lr, "name": "conn_no_decay"},
        ]
    # CPU: foreach=False keeps results bit-identical between a run and its resumed twin whatever the grouping.
    # CUDA: the fused kernel (one launch for every tensor) where the parameters are plain tensors; foreach (a few
    # launches per group) for DTensor shards (FSDP2).
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    plain = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
    fast = {"fused": True} if on_cuda and plain else {"foreach": on_cuda}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fast)


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """LR multiplier (of the peak) for 0-based optimiser step `step` of `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        return wsd_multiplier(step, total, cfg)
    if cfg.name == "step":  # mHC paper Table 5: 0.316x at 80%, 0.1x at 90% of training
        frac, mult = step / max(total, 1), 1.0
        for milestone, factor in zip(cfg.step_milestones, cfg.step_factors):
            if frac >= milestone:
                mult = factor
        return mult
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def wsd_decay_start(total: int, cfg: ScheduleConfig) -> int:
    """The first decay step of schedule=wsd: `decay_start` when set, else the last `decay_fraction` of `total`."""
    if cfg.decay_start:
        return cfg.decay_start
    return max(cfg.warmup_steps, total - round(cfg.decay_fraction * total))


def wsd_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay past the warm-up: 1 until the decay starts at step s, then over the D = total - s decay
    steps, with progress p = (step - s + 1) / D (so the last step trains at exactly `min_lr_ratio`):
    linear m + (1 - m)(1 - p), or 1-sqrt m + (1 - m)(1 - sqrt(p)). Steps past `total` stay at m."""
    start = wsd_decay_start(total, cfg)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / max(1, total - start))
    left = 1.0 - math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * left


def build_scheduler(opt: torch.optim.Optimizer, total: int, cfg: ScheduleConfig, connection_warmup_steps: int = 0):
    """LambdaLR over the main multiplier; with `connection_warmup_steps` W > 0, the `conn_*` groups' function is it
    times the connection's ramp (`connection_ramp`)."""
    if connection_warmup_steps <= 0:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, total, cfg))
    fns = [
        (lambda step: lr_multiplier(step, total, cfg) * connection_ramp(step, connection_warmup_steps))
        if g.get("name", "").startswith("conn_")
        else (lambda step: lr_multiplier(step, total, cfg))
        for g in opt.param_groups
    ]
    return torch.optim.lr_scheduler.LambdaLR(opt, fns)


def connection_ramp(step: int, warmup: int) -> float:
    """The connection groups' extra multiplier at 0-based step `step`: (step + 1) / warmup, then 1."""
    return min(1.0, (step + 1) / warmup)
