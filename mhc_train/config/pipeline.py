"""Pipeline facts that config validation needs: reading a CSV schedule file (its stage count, micro-batches and
whether it splits the backward). Plain functions, no process group; `mhc_train.parallel.schedules` uses the same
reader to lay the stages out, so the check and the run read a file the same way.
"""

from __future__ import annotations


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
