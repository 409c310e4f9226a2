"""The start-up check that the run directory is shared across nodes (mhc_train/train/shared_dir.py), at 2 gloo
ranks: one directory passes and leaves nothing behind; a node-local one (simulated: each rank its own directory)
is refused on every rank with one line naming the directory and the fix."""

import pytest

from tests.support.launch import run, torchrun_cmd

pytestmark = pytest.mark.slow  # torchrun, 2 processes


def _probe(pattern: str) -> str:
    return run(torchrun_cmd([], nproc=2, module="tests.train.shared_dir_probe"), timeout=180, SHARED_PROBE_DIR=pattern)


def test_a_shared_run_dir_passes_and_leaves_no_marker(tmp_path):
    out = _probe(str(tmp_path / "run"))
    assert "rank 0: ok" in out and "rank 1: ok" in out, out
    assert list((tmp_path / "run").iterdir()) == []


def test_a_node_local_run_dir_is_refused_on_every_rank(tmp_path):
    out = _probe(str(tmp_path / "node{rank}" / "run"))
    for rank in (0, 1):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"rank {rank}: refused: "))
        assert "is not shared across nodes" in line and "rank 1 on" in line and "filesystem every node mounts" in line
    assert f"run_dir {tmp_path / 'node0' / 'run'}" in out
