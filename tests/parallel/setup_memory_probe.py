"""Run under torchrun: the peak resident memory one rank adds while the parallel engine is built (`build_engine`,
with the model built as the trainer builds it), next to the model's size. Writes one JSON file per rank.

Peak RSS comes from the kernel (`VmHWM` in /proc/self/status, reset through /proc/self/clear_refs just before the
build), so it sees every allocation, transient ones included, whoever makes them (torch, DeepSpeed, FSDP's copies).
On CPU the host is the device: a full model anywhere on the rank shows up. An engine is first built for a tiny
model of the same layout, so one-time costs (imports, DeepSpeed's compiled ops, the process group's buffers) fall
before the baseline and what is measured is the model's memory. The probe runs with a fixed malloc mmap threshold
(MALLOC_MMAP_THRESHOLD_, set by the test) so a freed tensor's pages go back to the kernel and RSS follows what is
live, not the allocator's heap.

Two peaks: when the engine's training copy has been filled (`materialise` / `materialise_each` returned: the
parameters alone), and when `build_engine` returns (with the engine's own per-partition state: DeepSpeed ZeRO-3
allocates an fp32 master copy and a gradient partition at initialisation). Each rank writes its numbers to
`$PROBE_OUT/rank<r>.json` (one file per rank: lines printed by two ranks into one pipe can interleave).

    python -m torch.distributed.run --nproc_per_node=2 -m tests.parallel.setup_memory_probe <overrides>
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys

import torch


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _recording(fn, peaks: list):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        peaks.append(_kib("VmHWM"))
        return out

    return wrapped


def main(overrides: list[str]) -> None:
    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine, builds_on_meta, data_parallel, fsdp, init_distributed

    cfg = load_config(overrides)
    tiny = load_config([*overrides, "model.dim=32", "model.n_layer=1", "model.n_head=4", "model.vocab_size=256"])
    torch.set_num_threads(1)
    info = init_distributed(cfg.train.device)
    device = "meta" if builds_on_meta(cfg) else "cpu"
    warm = build_engine(build_model(tiny.model, tiny.connection, seed=0, device=device), tiny, info)
    del warm
    torch.distributed.barrier()
    gc.collect()
    base_kib = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    filled = []
    for mod in (fsdp, data_parallel):  # record the peak as each materialisation returns
        for name in ("materialise", "materialise_each"):
            if hasattr(mod, name):
                setattr(mod, name, _recording(getattr(mod, name), filled))
    model = build_model(cfg.model, cfg.connection, seed=cfg.train.seed, device=device)
    engine = build_engine(model, cfg, info)
    peak_kib = _kib("VmHWM")
    params = list(model.parameters())
    total = sum(p.numel() for p in params) * 4
    block = max(sum(p.numel() for p in layer.parameters()) for layer in model.layers.values()) * 4
    out = {
        "rank": info.rank,
        "world": info.world,
        "engine": engine.name,
        "added_peak_bytes": (peak_kib - base_kib) * 1024,
        "filled_peak_bytes": (max(filled) - base_kib) * 1024 if filled else None,
        "model_bytes": total,
        "block_bytes": block,
    }
    with open(os.path.join(os.environ["PROBE_OUT"], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
