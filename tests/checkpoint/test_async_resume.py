"""Asynchronous saves on 2 gloo ranks (FSDP2, DCP), two launches: a run saving asynchronously (step 2 written while
steps 3-4 train), and a run resumed from its step-2 checkpoint saving synchronously. The resumed run continues
bit-exactly (losses and weights), and its synchronous step-4 checkpoint equals the asynchronous one tensor for tensor.
The resume is probed (`tests.support.read_probe`, when="resume"): each rank digests its share of the shards, no file twice, and rank 0 not all;
a newer checkpoint damaged in rank 1's share is caught there, moved aside, and the resume falls back to step 2.
The same 2-rank checkpoint also resumes in one process (DCP re-shards at load: another world size), to tolerance."""

import pytest
import torch

from mhc_train.checkpoint import CheckpointManager
from mhc_train.checkpoint.shared_verify import share
from mhc_train.config import load_config
from mhc_train.train.trainer import Trainer
from tests.support import launch, read_probe, runs
from tests.support.configs import run_overrides

pytestmark = pytest.mark.slow  # torchrun, 2 gloo ranks

COMMON = {
    "train.max_steps": 4,
    "train.batch_size": 4,
    "checkpoint.every": 2,
    "train.threads": 1,
    "connection": "mhc",
    "parallel.engine": "fsdp",
    "checkpoint.format": "dcp",
}


def test_fsdp_async_save_equals_sync_and_resumes_exactly(prepared_data, tmp_path):
    async_run, resumed = tmp_path / "async", tmp_path / "resumed"
    out = launch.torchrun(prepared_data, async_run, **COMMON, **{"checkpoint.async_save": "true"})
    assert out.count("committed: written and verified in the background") == 2, out[-2000:]
    runs.copy_checkpoint(async_run, resumed, 2)
    runs.copy_checkpoint(async_run, resumed, 4)  # with a damaged file in rank 1's share: auto-resume falls back to 2
    listed = CheckpointManager.load(resumed / "checkpoints/step_00000004.pt")["shards"]["files"]
    victim = resumed / "checkpoints/dcp/step_00000004" / next(iter(share(listed, 2, 1)))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    probe = tmp_path / "probe"
    out = launch.torchrun(prepared_data, resumed, module=read_probe.MODULE, env=read_probe.probe_env(probe, "resume"),
                          **COMMON)  # fmt: skip
    assert f"{victim.name} is damaged" in out and (resumed / "checkpoints/damaged/step_00000004.pt").is_file(), out
    assert "resumed from" in out and "step_00000002.pt" in out
    assert runs.losses(async_run)[-2:] == runs.losses(resumed)  # steps 3-4, bit-exact
    want, got = runs.weights(async_run, 4), runs.weights(resumed, 4)  # async-written vs sync-written
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    shards = resumed / "checkpoints/dcp/step_00000002"
    sizes = {f.name: f.stat().st_size for f in shards.iterdir()}
    reads = read_probe.reads(probe, "resume")
    digested = {r: [p["path"].rsplit("/", 1)[-1] for p in reads[r] if p["how"] == "digest" and str(shards) in p["path"]]
                for r in (0, 1)}  # fmt: skip
    assert digested[0] and digested[1], digested  # both ranks verified a share
    assert sorted(digested[0] + digested[1]) == sorted(sizes), digested  # every shard once, none twice
    assert sum(sizes[f] for f in digested[0]) < sum(sizes.values())  # rank 0 no longer reads them all

    one = tmp_path / "one"  # the 2-rank FSDP checkpoint resumed at world 1 (DCP re-shards on load)
    runs.copy_checkpoint(async_run, one, 2)
    t = Trainer(load_config(run_overrides(prepared_data, one, **{**COMMON, "parallel.engine": "none"})))
    assert t.step == 2
    t.run()
    torch.testing.assert_close(torch.tensor(runs.losses(one)), torch.tensor(runs.losses(resumed)), rtol=1e-5, atol=0)
