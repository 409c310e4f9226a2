"""Shard digests at save time, in one process: every rank digests the files it wrote (`Format.writer_of`) and rank 0
merges the digests, digesting itself only what no rank claimed; the merged list equals digesting everything. The
ranks are simulated by patching the gather (the real 2-rank run is tests/checkpoint/test_sharded_save.py)."""

from __future__ import annotations

import pytest

from mhc_train.checkpoint import CheckpointManager, integrity
from mhc_train.checkpoint import manager as manager_module
from mhc_train.checkpoint.formats import FORMATS
from mhc_train.config import CheckpointConfig
from mhc_train.parallel import DistInfo

DCP = ["__0_0.distcp", "__1_0.distcp", "__1_1.distcp", ".metadata"]
DEEPSPEED = [
    "mp_rank_00_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "zero_pp_rank_1_mp_rank_00_model_states.pt",
]


def test_writer_of_reads_the_rank_from_each_format_s_file_names():
    assert [FORMATS["dcp"].writer_of(f) for f in DCP] == [0, 1, 1, 0]
    assert [FORMATS["deepspeed"].writer_of(f) for f in DEEPSPEED] == [0, 0, 1, 1, 1]
    assert FORMATS["file"].writer_of("anything") == 0


def _shards(tmp_path, names):
    directory = tmp_path / "shards"
    directory.mkdir()
    for i, name in enumerate(names):
        (directory / name).write_bytes(bytes([i]) * (100 + i))
    return directory


@pytest.mark.parametrize("fmt,names", [("dcp", DCP), ("deepspeed", DEEPSPEED)])
def test_each_rank_digests_its_own_files_and_rank_0_lists_them_all(tmp_path, monkeypatch, fmt, names):
    directory = _shards(tmp_path, names)
    read = []
    digest = integrity.digest
    monkeypatch.setattr(integrity, "digest", lambda path, limit=None: read.append(path.name) or digest(path, limit))
    sent = {}

    def as_rank_1(local, info):  # rank 1's side of the gather: what travels, and {} back
        sent.update(local)
        return {}

    monkeypatch.setattr(manager_module, "gather_dicts", as_rank_1)
    rank1 = CheckpointManager(tmp_path / "run", CheckpointConfig(), DistInfo(rank=1, world=2))
    assert rank1.shard_digests(FORMATS[fmt], directory) == {}
    ones = {f for f in names if FORMATS[fmt].writer_of(f) == 1}
    assert set(read) == set(sent) == ones  # rank 1 read and sent exactly the files it wrote

    read.clear()
    monkeypatch.setattr(manager_module, "gather_dicts", lambda local, info: {**local, **sent})
    rank0 = CheckpointManager(tmp_path / "run", CheckpointConfig(), DistInfo(rank=0, world=2))
    merged = rank0.shard_digests(FORMATS[fmt], directory)
    assert not set(read) & ones  # rank 0 read no file rank 1 wrote
    assert merged == integrity.shard_digests(directory)  # the same list as digesting everything on rank 0


def test_rank_0_digests_what_no_rank_claimed(tmp_path, monkeypatch):
    """A file whose writer is a rank that sent nothing (another naming, a rank that does not see it) is still listed."""
    directory = _shards(tmp_path, [*DCP, "__7_0.distcp"])
    monkeypatch.setattr(manager_module, "gather_dicts", lambda local, info: local)  # the others sent nothing
    rank0 = CheckpointManager(tmp_path / "run", CheckpointConfig(), DistInfo(rank=0, world=2))
    assert rank0.shard_digests(FORMATS["dcp"], directory) == integrity.shard_digests(directory)
