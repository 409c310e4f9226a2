"""HSDP (`parallel.engine=fsdp`, `parallel.dp_replicate=2`): FSDP2 over the 2-D (dp_replicate, dp_shard) mesh, shards
within a replica group and replicas across, equals one process at 4 gloo ranks (2 x 2): loss for loss, every gradient
of step 1, weights after 3 steps. Fails where dp_replicate is unknown or ignored (each rank would hold a quarter).
Under `parallel.recompute=mhc` (FSDP units per F module, the sites and norms whole on every rank and their gradients
averaged over both mesh dimensions: fsdp.py note 1), which changes no bit of one process's run."""

from __future__ import annotations

import re

import pytest

from tests.support import launch
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
    overrides = {**COMMON, "parallel.engine": "fsdp", "parallel.dp_replicate": 2, "parallel.recompute": "mhc"}
    out = launch.torchrun(prepared_data, run, **overrides, nproc=4)
    assert_close_runs(run, ref, 3)
    assert "(HSDP dp_replicate=2 x dp_shard=2)" in out, out[-2000:]
    found = re.search(r"holds ([\d,]+) of ([\d,]+) parameter elements \(([\d,]+) in shards, ([\d,]+) replicated\)", out)
    held, total, shards, whole = (int(v.replace(",", "")) for v in found.groups())
    assert held == shards + whole and 0 < whole < total // 2, out[-2000:]  # the sites and norms (25,048 of 111,096)
    sharded = total - whole  # half of the rest on each rank: sharded over 2, replicated over 2
    assert sharded // 2 - 64 <= shards <= sharded // 2 + 64, out[-2000:]
