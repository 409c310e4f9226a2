"""The README's fit table: which parallel preset fits which model at which GPU count, from `make_plan`.

`fit_rows(models, worlds, presets)` plans every (model, preset, world) with one sequence per GPU (`train=gpu`, seq
4096, `train.batch_size` = the data-parallel ranks x the micro-batches a step needs, `train.grad_accum=1` under a
pipeline); a preset the world cannot hold is recorded as refused. `markdown(rows)` renders the table and, for every
model and world, the launch command of the preset that fits with the most room. `scripts/plan_table.py` writes it
into the README between its markers.
"""

from __future__ import annotations

from mhc_train.config import ConfigError, load_config
from mhc_train.plan.estimate import make_plan

PRESETS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp_recompute", "pp_fsdp", "tp2_fsdp", "tp4_fsdp", "pp_tp_fsdp")
MARK_START, MARK_END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def overrides(model: str, preset: str, world: int) -> list[str]:
    """The overrides of one cell: one sequence of 4096 tokens per GPU and micro-batch."""
    cfg = load_config([f"parallel={preset}"])
    if cfg.parallel.pp > 1:
        m = cfg.parallel.pp_microbatches or 2 * cfg.parallel.pp
        batch = world // (cfg.parallel.pp * cfg.parallel.tp) * m  # the data-parallel ranks x micro-batches
        return [f"model={model}", "train=gpu", f"parallel={preset}", f"train.batch_size={batch}", "train.grad_accum=1"]
    dp = max(1, world // cfg.parallel.tp)  # the tp ranks of a data-parallel group share its sequence
    return [f"model={model}", "train=gpu", f"parallel={preset}", f"train.batch_size={dp}"]


def fit_rows(models, worlds, presets=PRESETS, device_gib: float = 80.0) -> list[dict]:
    """One record per (model, preset, world): the overrides, the plan's total GiB and verdict (None: refused)."""
    rows = []
    for model in models:
        for preset in presets:
            for world in worlds:
                ov = overrides(model, preset, world)
                try:
                    plan = make_plan(load_config(ov), world, device_gib)
                except ConfigError as e:
                    rows.append({"model": model, "preset": preset, "world": world, "overrides": ov,
                                 "refused": str(e)})  # fmt: skip
                    continue
                rows.append({"model": model, "preset": preset, "world": world, "overrides": ov,
                             "total_gib": plan["per_gpu_gib"]["total"], "fits": plan["fits"],
                             "per_gpu_gib": plan["per_gpu_gib"], "engine": plan["engine"]})  # fmt: skip
    return rows


def launch_command(row: dict) -> str:
    """torchrun on 8 GPUs per node (one node up to 8 GPUs); under Slurm, scripts/slurm/ renders the same line."""
    world = row["world"]
    nodes, per_node = max(1, world // 8), min(world, 8)
    rdzv = "" if nodes == 1 else " --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500"
    return f"torchrun --nnodes={nodes} --nproc_per_node={per_node}{rdzv} -m mhc_train.train " + " ".join(
        row["overrides"]
    )


def _cell(row: dict) -> str:
    if "refused" in row:
        return "refused"
    return f"{row['total_gib']:.1f} {'fits' if row['fits'] else 'no'}"


def markdown(rows: list[dict], device_gib: float = 80.0) -> str:
    """The fit table (GiB per GPU, the largest rank) and the launch command of the best fitting preset per cell."""
    worlds = sorted({r["world"] for r in rows})
    head = "| model | `parallel=` | " + " | ".join(f"{w} GPUs" for w in worlds) + " |"
    lines = [head, "|" + "---|" * (2 + len(worlds))]
    keys = list(dict.fromkeys((r["model"], r["preset"]) for r in rows))
    by = {(r["model"], r["preset"], r["world"]): r for r in rows}
    for model, preset in keys:
        cells = [_cell(by[(model, preset, w)]) for w in worlds]
        lines.append(f"| {model} | `{preset}` | " + " | ".join(cells) + " |")
    lines += ["", f"Launch (the fitting preset with the most room in {device_gib:g} GiB):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for w in worlds:
            fit = [r for r in rows if r["model"] == model and r["world"] == w and r.get("fits")]
            if fit:
                best = min(fit, key=lambda r: r["total_gib"])
                lines.append(f"- {model}, {w} GPUs: `{launch_command(best)}`")
                continue
            lines.append(f"- {model}, {w} GPUs: no shipped preset fits")
    return "\n".join(lines)
