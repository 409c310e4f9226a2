"""A discrete-event simulator of pipeline schedules, for planning runs larger than can be tested.

Input: P ranks, M micro-batches, per-micro-batch costs of one stage chunk (forward F, backward-for-input I,
backward-for-weights W; a fused backward B costs I + W), the time to send one stage boundary (the `[b, T, n, C]`
stream state: n times the residual baseline's bytes), and the activation bytes a chunk keeps per micro-batch.
Output per schedule: makespan, bubble fraction (idle share of P x makespan), exposed communication (makespan minus
the makespan with free communication) and peak activation bytes per rank.

Action orders: 1F1B is generated here; ZBV and DualPipeV are the exact per-rank orders torch.distributed.pipelining
runs (`pipeline_order` of its schedule classes, built from placeholder stages: a private API, pinned torch). In an
OVERLAP_F_B pair the forward and backward run back to back and the pair's communication is hidden (that is what the
overlap is for); its sends still gate the receiving rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

SCHEDULES = ("1f1b", "zbv", "dualpipev")


@dataclass
class Costs:
    f: float  # forward of one stage chunk, one micro-batch (ms)
    i: float  # backward for inputs
    w: float  # backward for weights
    comm: float  # one boundary send of one micro-batch (ms): bytes / bandwidth + latency
    act_bytes: float = 0.0  # activation bytes one chunk keeps per micro-batch until its weight backward


def _one_f_one_b(P: int, M: int) -> dict[int, list[tuple]]:
    order = {}
    for r in range(P):
        warm = min(P - r - 1, M)
        acts = [("F", r, m) for m in range(warm)]
        f, b = warm, 0
        while b < M:
            if f < M:
                acts.append(("F", r, f))
                f += 1
            acts.append(("B", r, b))
            b += 1
        order[r] = acts
    return order


def _torch_order(schedule: str, P: int, M: int) -> dict[int, list[tuple]]:
    import torch
    from torch.distributed.pipelining import schedules as S

    cls = S.ScheduleZBVZeroBubble if schedule == "zbv" else S.ScheduleDualPipeV
    stages = [
        SimpleNamespace(
            group_size=P,
            group_rank=0,
            stage_index=i,
            num_stages=2 * P,
            is_first=i == 0,
            is_last=i == 2 * P - 1,
            submod=torch.nn.Identity(),
            has_backward=True,
            scale_grads=True,
        )
        for i in (0, 2 * P - 1)
    ]
    raw = cls(stages, M).pipeline_order
    kinds = {
        "F": "F",
        "I": "I",
        "W": "W",
        "B": "B",
        "FULL_BACKWARD": "B",
        "BACKWARD_INPUT": "I",
        "BACKWARD_WEIGHT": "W",
        "FORWARD": "F",
    }
    order = {}
    for r, acts in raw.items():
        out = []
        for a in acts:
            if a is None:
                continue
            name = str(a.computation_type).split(".")[-1]
            if name in ("OVERLAP_F_B",):
                out.append(
                    (
                        "FB",
                        tuple(
                            (kinds[str(s.computation_type).split(".")[-1]], s.stage_index, s.microbatch_index)
                            for s in a.sub_actions
                        ),
                    )
                )
            elif name in kinds:
                out.append((kinds[name], a.stage_index, a.microbatch_index))
        order[r] = out
    return order


def schedule_order(schedule: str, P: int, M: int) -> dict[int, list[tuple]]:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return _one_f_one_b(P, M) if schedule == "1f1b" else _torch_order(schedule, P, M)


def stage_rank(schedule: str, stage: int, P: int) -> int:
    return stage if schedule == "1f1b" or stage < P else 2 * P - 1 - stage


def _run(schedule: str, P: int, M: int, c: Costs, order) -> dict:
    n_stages = P if schedule == "1f1b" else 2 * P
    done: dict[tuple, float] = {}  # (kind, stage, mb) -> end time (I and B both record "I"; B and W record "W")
    rank_time = [0.0] * P
    busy = [0.0] * P
    live, peak = [0.0] * P, [0.0] * P
    pos = [0] * P

    def ready(kind, s, m, hidden):
        """Time the inputs of (kind, s, m) are available on its rank, or None if not yet produced."""
        r = stage_rank(schedule, s, P)
        if kind == "F":
            if s == 0:
                return 0.0
            src = ("F", s - 1, m)
            if src not in done:
                return None
            hop = 0.0 if stage_rank(schedule, s - 1, P) == r or hidden else c.comm
            return done[src] + hop
        if kind in ("I", "B"):
            own = done.get(("F", s, m))
            if own is None:
                return None
            if s == n_stages - 1:
                return own
            src = ("I", s + 1, m)
            if src not in done:
                return None
            hop = 0.0 if stage_rank(schedule, s + 1, P) == r or hidden else c.comm
            return max(own, done[src] + hop)
        return done.get(("I", s, m))  # W

    def cost(kind):
        return {"F": c.f, "I": c.i, "W": c.w, "B": c.i + c.w}[kind]

    def finish(kind, s, m, end, r):
        if kind == "F":
            done[("F", s, m)] = end
            live[r] += c.act_bytes
            peak[r] = max(peak[r], live[r])
        if kind in ("I", "B"):
            done[("I", s, m)] = end
        if kind in ("W", "B"):
            done[("W", s, m)] = end
            live[r] -= c.act_bytes

    remaining = sum(len(v) for v in order.values())
    while remaining:
        progressed = False
        for r in range(P):
            if pos[r] >= len(order[r]):
                continue
            act = order[r][pos[r]]
            subs = act[1] if act[0] == "FB" else (act,)
            times = [ready(k, s, m, hidden=act[0] == "FB") for k, s, m in subs]
            if any(t is None for t in times):
                continue
            t = max([rank_time[r], *times])
            for k, s, m in subs:
                t += cost(k)
                busy[r] += cost(k)
                finish(k, s, m, t, r)
            rank_time[r] = t
            pos[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule}: the action orders deadlock (P={P}, M={M})")
    makespan = max(rank_time)
    return {"makespan": makespan, "bubble_fraction": 1 - sum(busy) / (P * makespan), "peak_act_bytes": peak}


def simulate(schedule: str, P: int, M: int, costs: Costs) -> dict:
    """Makespan, bubble fraction, exposed communication and peak activation bytes per rank for one schedule."""
    order = schedule_order(schedule, P, M)
    with_comm = _run(schedule, P, M, costs, order)
    free = _run(schedule, P, M, Costs(costs.f, costs.i, costs.w, 0.0, costs.act_bytes), order)
    return {**with_comm, "exposed_comm": with_comm["makespan"] - free["makespan"], "schedule": schedule, "P": P, "M": M}
