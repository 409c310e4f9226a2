"""Disk full during a 2-rank save (gloo): whichever rank's write fails, every rank raises the same one-line
CheckpointError within seconds (not after parallel.timeout_s at the next collective), the earlier checkpoint stays
the newest complete one, and no half-written shard directory is left. The ranks run tests/checkpoint/disk_full_ranks.py,
which injects ENOSPC into a DCP shard write (rank 1) and into the step file's write (rank 0)."""

import json

import pytest

from tests.checkpoint import disk_full_ranks
from tests.support import launch

pytestmark = pytest.mark.slow  # torchrun, 2 gloo ranks


def test_a_rank_out_of_disk_fails_every_rank_at_once_with_one_line(tmp_path):
    cmd = launch.torchrun_cmd([str(tmp_path)], module="tests.checkpoint.disk_full_ranks")
    out = launch.run(cmd, timeout=4 * disk_full_ranks.TIMEOUT_S)
    results = [
        json.loads(line) for f in sorted(tmp_path.glob("results_*.jsonl")) for line in f.read_text().splitlines()
    ]
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["rank"]] = r
    assert set(by_case) == {"shard", "step_file"} and all(len(v) == 2 for v in by_case.values()), out[-3000:]
    for name, ranks in by_case.items():
        raised = {r["raised"] for r in ranks.values()}
        assert len(raised) == 1, (name, raised)  # every rank raises the same line
        line = raised.pop()
        assert line.startswith("CheckpointError: no space left on the device for checkpoint"), (name, line)
        assert "relaunch with checkpoint.resume=auto" in line, (name, line)
        slowest = max(r["seconds"] for r in ranks.values())
        assert slowest < disk_full_ranks.TIMEOUT_S / 4, (name, slowest)  # not the group's timeout
        assert all(r["steps"] == [1] for r in ranks.values()), (name, ranks)  # step 1 stays the resume point
        assert not any(r["partial"] for r in ranks.values()), (name, ranks)  # nothing half-written is left
