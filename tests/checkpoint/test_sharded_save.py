"""Sharded checkpoint saves on 2 gloo ranks (FSDP2, checkpoint.format=dcp): each rank digests the shards it wrote
itself and rank 0 reads no file another rank wrote while saving (measured by `tests.support.read_probe`); the
checkpoint lists every file's digest, resumes bit-exactly, and a damaged shard of either rank is still caught."""

import shutil

import pytest
import torch

from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.config import load_config
from tests.support import launch, read_probe, runs
from tests.support.configs import run_overrides

pytestmark = pytest.mark.slow  # torchrun, 2 gloo ranks

COMMON = {
    "train.max_steps": 4,
    "train.batch_size": 4,
    "checkpoint.every": 0,
    "train.threads": 1,
    "connection": "mhc",
    "parallel.engine": "fsdp",
    "checkpoint.format": "dcp",
}


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fsdp_dcp_save_reads_only_own_shards_resumes_exactly_and_catches_damage(prepared_data, tmp_path):
    full, split, probe = tmp_path / "full", tmp_path / "split", tmp_path / "probe"
    launch.torchrun(prepared_data, full, **COMMON)
    launch.torchrun(prepared_data, split, module=read_probe.MODULE, env=read_probe.probe_env(probe, "save"),
                    **COMMON, **{"train.stop_at_step": 2})  # fmt: skip

    shards = split / "checkpoints/dcp/step_00000002"
    files = sorted(str(f.relative_to(shards)) for f in shards.rglob("*") if f.is_file())
    by_rank = {r: [f for f in files if f.startswith(f"__{r}_")] for r in (0, 1)}
    assert by_rank[0] and by_rank[1], files
    reads = read_probe.reads(probe)
    assert set(reads) == {0, 1}
    read_names = {r: {p["path"].rsplit("/", 1)[-1] for p in reads[r]} for r in (0, 1)}
    assert not read_names[0] & set(by_rank[1]), sorted(read_names[0])  # rank 0 opened no file rank 1 wrote
    assert set(by_rank[1]) <= {p["path"].rsplit("/", 1)[-1] for p in reads[1] if p["how"] == "digest"}, reads[1]
    not_rank1 = sum((shards / f).stat().st_size for f in files if f not in by_rank[1])
    read0 = sum(p["bytes"] for p in reads[0] if str(shards) in p["path"])
    assert 0 < read0 <= not_rank1, (read0, not_rank1)  # its own shards and .metadata, nothing more

    step = split / "checkpoints/step_00000002.pt"
    state = CheckpointManager.load(step)
    assert sorted(state["shards"]["files"]) == files  # every file listed, as when rank 0 digested them all
    manager = CheckpointManager(split, load_config(run_overrides(prepared_data, split)).checkpoint)
    assert manager.verify(step, state) > 0

    damaged = tmp_path / "damaged"  # a copy: the resume below uses the intact one
    runs.copy_checkpoint(split, damaged, 2)
    for name in (by_rank[0][0], by_rank[1][0], ".metadata"):
        shard = damaged / "checkpoints/dcp/step_00000002" / name
        offset = shard.stat().st_size // 2
        _flip(shard, offset)
        with pytest.raises(CheckpointError, match=f"{name} is damaged"):
            manager.verify(damaged / "checkpoints/step_00000002.pt", state)
        _flip(shard, offset)
    shutil.rmtree(damaged)

    out = launch.torchrun(prepared_data, split, **COMMON)
    assert "resumed from" in out
    assert runs.losses(full) == runs.losses(split)  # bit-exact against the uninterrupted run
    want, got = runs.weights(full, 4), runs.weights(split, 4)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
