"""Pipeline schedules: stage layouts per schedule and the torch.distributed.pipelining schedule objects. Needs no
process group. CSV schedule files are read by `mhc_train.config.pipeline.read_csv_schedule` (config validation uses
the same reader), re-exported here."""

from __future__ import annotations

from mhc_train.config import PP_SCHEDULES, SPLIT_BACKWARD_SCHEDULES
from mhc_train.config.pipeline import read_csv_schedule

__all__ = ["build_schedule", "layer_ranges", "pipeline_layout", "read_csv_schedule"]


def pipeline_layout(schedule: str, pp: int, stages_per_rank: int = 0, csv_path: str = ""):
    """(stage count, {pipeline rank: its global stage ids}) of a schedule.

    1f1b: rank r holds stage r. interleaved1f1b: v stages per rank (default 2), rank r holds r, r+pp, ...
    zbv / dualpipev: the V, rank r holds stages r and 2pp-1-r (micro-batches enter and leave at rank 0).
    csv: whatever the file places on each rank."""
    if schedule == "1f1b":
        return pp, {r: [r] for r in range(pp)}
    if schedule == "interleaved1f1b":
        v = stages_per_rank or 2
        return pp * v, {r: [r + k * pp for k in range(v)] for r in range(pp)}
    if schedule in SPLIT_BACKWARD_SCHEDULES:
        return 2 * pp, {r: [r, 2 * pp - 1 - r] for r in range(pp)}
    if schedule == "csv":
        n, layout, _, _ = read_csv_schedule(csv_path, pp)
        return n, layout
    raise ValueError(f"unknown pipeline schedule {schedule!r}: allowed values are {', '.join(PP_SCHEDULES)}")


def layer_ranges(n_layer: int, n_stages: int) -> list[range]:
    if n_layer % n_stages:
        raise ValueError(f"model.n_layer={n_layer} is not divisible by the {n_stages} pipeline stages")
    per = n_layer // n_stages
    return [range(s * per, (s + 1) * per) for s in range(n_stages)]


def build_schedule(name: str, stages, n_microbatches: int, loss_fn, csv_path: str = ""):
    from torch.distributed.pipelining import (
        Schedule1F1B,
        ScheduleDualPipeV,
        ScheduleInterleaved1F1B,
        ScheduleZBVZeroBubble,
    )
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    if name == "1f1b":
        return Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    if name == "csv":  # torch's runtime lowers the compute-only actions and adds the sends and receives
        schedule = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn)
        schedule._load_csv(csv_path)
        return schedule
    cls = {"interleaved1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
    return cls[name](stages, n_microbatches, loss_fn=loss_fn)
