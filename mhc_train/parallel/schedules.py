"""Pipeline schedules: stage layouts per schedule, CSV schedule files, and the torch.distributed.pipelining schedule
objects. Needs no process group (config validation reads schedule files through `read_csv_schedule`)."""

from __future__ import annotations

from mhc_train.config import PP_SCHEDULES, SPLIT_BACKWARD_SCHEDULES


def read_csv_schedule(path: str, pp: int) -> tuple[int, dict[int, list[int]], int, bool]:
    """A compute-only schedule file in torch's CSV format (one row per pipeline rank, actions such as `0F3`, `1B0`,
    `2I1`, `2W1`): returns (stage count, {rank: its stage ids}, micro-batch count, whether it splits the backward).
    Raises ValueError naming the problem; needs no process group."""
    import csv

    from torch.distributed.pipelining.schedules import _Action

    try:
        with open(path, newline="") as f:
            rows = [[c.strip() for c in row if c.strip()] for row in csv.reader(f)]
    except OSError as e:
        raise ValueError(f"cannot read the schedule file {path!r} ({e.strerror})") from e
    if len(rows) != pp:
        raise ValueError(f"the schedule file {path!r} has {len(rows)} rows but parallel.pp={pp} (one row per rank)")
    layout, mbs, split = {}, set(), False
    for rank, row in enumerate(rows):
        try:
            actions = [_Action.from_str(c) for c in row]
        except Exception as e:
            raise ValueError(f"the schedule file {path!r}, row {rank}: {e}") from e
        layout[rank] = sorted({a.stage_index for a in actions})
        mbs |= {a.microbatch_index for a in actions if a.microbatch_index is not None}
        split |= any(a.computation_type.value in ("I", "W") for a in actions)
        if not layout[rank]:
            raise ValueError(f"the schedule file {path!r}, row {rank}: rank {rank} runs no stage")
    stages = sorted(s for ids in layout.values() for s in ids)
    if stages != list(range(len(stages))):
        raise ValueError(f"the schedule file {path!r} must place stages 0..N-1 once each on the ranks, got {layout}")
    return len(stages), layout, len(mbs), split


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
