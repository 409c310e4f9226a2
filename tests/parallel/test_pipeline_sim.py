"""The pipeline simulator against a hand-computed case, and its V-schedule orders."""

import pytest

from tools.pipeline_sim import Costs, schedule_order, simulate


def test_one_f_one_b_matches_the_hand_computed_case():
    # P=2, M=2, F=1, B=2 (fused), no comm: rank 1 runs F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7]; rank 0 F0 [0,1]
    # F1 [1,2] B0 [4,6] B1 [7,9]: makespan 9, busy 12 of 18.
    r = simulate("1f1b", 2, 2, Costs(f=1, i=2, w=0, comm=0))
    assert r["makespan"] == 9 and r["bubble_fraction"] == pytest.approx(1 / 3) and r["exposed_comm"] == 0
    # with 0.5 per boundary send: F(1,0) [1.5,2.5], B(1,0) [2.5,4.5], F(1,1) [4.5,5.5], B(1,1) [5.5,7.5];
    # rank 0 B(0,0) [5,7], B(0,1) [8,10]: makespan 10, one unit of communication exposed.
    r = simulate("1f1b", 2, 2, Costs(f=1, i=2, w=0, comm=0.5, act_bytes=1))
    assert r["makespan"] == 10 and r["exposed_comm"] == pytest.approx(1.0)
    assert r["peak_act_bytes"] == [2, 1]  # rank 0 holds both micro-batches before its first backward


@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_v_schedules_run_every_action_and_beat_1f1b_bubble(schedule):
    order = schedule_order(schedule, 4, 16)
    flat = [a for acts in order.values() for a in acts]
    counted = sum(len(a[1]) if a[0] == "FB" else 1 for a in flat)
    assert counted >= 2 * 4 * 16 * 2  # F and (I+W or B) for 8 chunks x 16 micro-batches
    base = simulate("1f1b", 4, 16, Costs(1, 1, 1, 0))
    v = simulate(schedule, 4, 16, Costs(0.5, 0.5, 0.5, 0))  # two half-size chunks per rank
    assert v["bubble_fraction"] < base["bubble_fraction"]


def test_wider_boundary_exposes_more_communication():
    narrow = simulate("1f1b", 4, 8, Costs(1, 1, 1, comm=0.05))
    wide = simulate("1f1b", 4, 8, Costs(1, 1, 1, comm=0.2))  # n = 4 streams: 4x the bytes per send
    assert wide["exposed_comm"] > narrow["exposed_comm"]
