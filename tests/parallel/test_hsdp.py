"""HSDP (`parallel.engine=fsdp`, `parallel.dp_replicate=2`): FSDP2 over the 2-D (dp_replicate, dp_shard) mesh, shards
within a replica group and replicas across, equals one process at 4 gloo ranks (2 x 2): loss for loss, every gradient
of step 1, weights after 3 steps. Fails where dp_replicate is unknown or ignored (each rank would hold a quarter)."""

from __future__ import annotations

import re

import pytest

from tests.support import launch
from tests.support.configs import run_overrides
from tests.support.numerics import assert_close_runs

pytestmark = pytest.mark.slow  # torchrun, 4 gloo ranks

COMMON = {
    "train.max_steps": 3,
    "train.batch_size": 8,
    "checkpoint.every": 0,
    "train.threads": 1,
    "train.dump_grads_at": 1,
    "model.n_layer": 4,
    "connection": "mhc",
}  # test_distributed.py's pipeline settings: one reference run serves both files


def test_hsdp_2x2_matches_single_process(prepared_data, reference_runs, tmp_path):
    ref, run = reference_runs(**COMMON), tmp_path / "hsdp"
    overrides = {**COMMON, "parallel.engine": "fsdp", "parallel.dp_replicate": 2}
    out = launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **overrides), nproc=4), timeout=600)
    assert_close_runs(run, ref, 3)
    held, total = (int(v.replace(",", "")) for v in re.search(r"holds ([\d,]+) of ([\d,]+) param", out).groups())
    assert total // 2 - 64 <= held <= total // 2 + 64, out[-2000:]  # half: sharded over 2, replicated over 2
