"""The measured side of `mhc-train plan`: each rank's peak of live tensor bytes during a real training step on CPU.

    python -m torch.distributed.run --nproc_per_node=2 -m mhc_train.plan.measure [--presets fsdp,ddp] <overrides>

Each rank builds the model and the engine the way the trainer does (`builds_on_meta`, `build_engine`) inside
`LiveBytes`, so everything it allocates through the dispatcher is counted from the start: parameters, the engine's
copies and buckets, optimizer states. It then takes one warm-up step (AdamW allocates its states lazily), resets the
peak, and takes one more step on synthetic tokens (no data is prepared); the peak of that step is what `mhc-train
plan` predicts. Writes `$PLAN_MEASURE_OUT/rank<r>.json`, one file per rank: {"rank", "world", "peak", "set_up_peak",
"start"}, or with `--presets a,b` one such record per `parallel=<preset>`, measured one after the other in the same
processes (one launch: the imports and the process group are paid once). Tests and `scripts/bench_scale.py` drive
it; it is not a product command.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mhc_train.plan.live import LiveBytes


def synthetic_batch(cfg, seed: int = 0):
    """A `BatchFn` of random tokens: micro-batch `micro` of rank `rank`'s slice of the global batch."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1), generator=g)

    def batch(micro: int, rank: int, world: int):
        per = cfg.train.batch_size // world
        x = tokens[rank * per : (rank + 1) * per]
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    return batch


def measure_rank(cfg) -> dict:
    """Build, warm up one step, then measure one step's peak live bytes on this rank (module docstring)."""
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine, builds_on_meta, init_distributed

    torch.set_num_threads(1)
    info = init_distributed(cfg.train.device)
    batch = synthetic_batch(cfg)
    with LiveBytes() as mode:
        device = "meta" if builds_on_meta(cfg) else "cpu"
        model = build_model(cfg.model, cfg.connection, seed=cfg.train.seed, device=device)
        engine = build_engine(model, cfg, info)
        set_up = mode.peak
        for step in range(2):
            if step == 1:
                start = mode.live
                mode.reset_peak()
            engine.forward_backward(batch)
            engine.step()
    return {"rank": info.rank, "world": info.world, "peak": mode.peak, "set_up_peak": set_up, "start": start}


def main(argv: list[str]) -> None:
    import gc

    from mhc_train.config import load_config

    presets = argv[1].split(",") if argv[:1] == ["--presets"] else None
    overrides = argv[2:] if presets else argv
    if presets is None:
        result = measure_rank(load_config(overrides))
    else:
        result = {}
        for preset in presets:
            result[preset] = measure_rank(load_config([*overrides, f"parallel={preset}"]))
            gc.collect()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ.get("PLAN_MEASURE_OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])


def measure_setup(cfg, world: int, rank: int = 0) -> dict:
    """Peak live bytes while rank `rank` of `world` builds its engine under torch's fake process group (the model
    built as the trainer builds it, this rank's shards really allocated and filled on the host). Only for engines
    that set up without communicating (FSDP2; not DeepSpeed, which cannot initialise under a fake group)."""
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine, builds_on_meta
    from mhc_train.parallel.dist import DistInfo
    from mhc_train.plan.layout import fake_group

    with fake_group(world, rank), LiveBytes() as mode:
        device = "meta" if builds_on_meta(cfg) else "cpu"
        model = build_model(cfg.model, cfg.connection, seed=cfg.train.seed, device=device)
        engine = build_engine(model, cfg, DistInfo(rank, world, 0, torch.device("cpu")))
        held = mode.live
        del engine, model
    return {"rank": rank, "world": world, "set_up_peak": mode.peak, "held_after": held}
