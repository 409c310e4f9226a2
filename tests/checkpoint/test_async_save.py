"""Asynchronous DCP saves in one process (`checkpoint.async_save`): a write that fails leaves no step file, so the
previous checkpoint stays the resume point (retention deleted nothing), and a damaged shard of that asynchronously
written checkpoint is caught; a preemption commits the save in flight before it names it. That an asynchronous
checkpoint equals a synchronous one and resumes bit-exactly (2 ranks, FSDP) is tests/checkpoint/test_async_resume.py."""

from __future__ import annotations

import pytest

from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.config import load_config
from mhc_train.train.trainer import Trainer
from tests.support.configs import run_overrides

COMMON = {"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.format": "dcp", "connection": "mhc"}


def _run(data, run_dir, **extra) -> Trainer:
    t = Trainer(load_config(run_overrides(data, run_dir, **COMMON, **extra)))
    t.run()
    return t


def test_a_failed_background_write_commits_nothing_and_keeps_the_previous(prepared_data, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real = dcp.async_save
    calls = []

    def failing_second(state, **kw):
        calls.append(kw["checkpoint_id"])
        if len(calls) == 2:  # the write of step 4 dies (a full disk, a lost mount)
            raise_later = real(state, **kw)
            raise_later.result()
            future = type(raise_later)()
            future.set_exception(OSError(28, "No space left on device"))
            return future
        return real(state, **kw)

    monkeypatch.setattr(dcp, "async_save", failing_second)
    with pytest.raises(CheckpointError, match="no step file was written, so the previous checkpoint stays"):
        _run(prepared_data, tmp_path / "run", **{"checkpoint.async_save": "true", "checkpoint.keep_last": 1})
    done = CheckpointManager(tmp_path / "run", load_config(run_overrides(prepared_data, tmp_path)).checkpoint)
    assert [s for s, _ in done.complete()] == [2]  # step 4 never looked valid; step 2 was not pruned
    state = CheckpointManager.load(done.latest())
    assert done.verify(done.latest(), state) > 0 and len(state["shards"]["files"]) >= 2
    shard = next((tmp_path / "run/checkpoints/dcp/step_00000002").glob("__0_*.distcp"))  # written asynchronously
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is damaged"):
        done.verify(done.latest(), state)


def test_a_preemption_commits_the_save_in_flight_before_it_says_so(prepared_data, tmp_path, monkeypatch):
    import dataclasses
    import signal

    from mhc_train.train.errors import Preempted

    t = Trainer(
        load_config(run_overrides(prepared_data, tmp_path / "run", **COMMON, **{"checkpoint.async_save": "true"}))
    )
    step = Trainer.train_step

    def stop_after_3(self):
        result = step(self)
        if self.step == 3:  # as if SIGTERM arrived during step 3, with step 2's save possibly still in flight
            self.preemption.signals.received = signal.SIGTERM
            result = dataclasses.replace(result, stop=True)
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_3)
    with pytest.raises(Preempted, match="wrote checkpoint .*step_00000003.pt"):
        t.run()
    done = CheckpointManager(tmp_path / "run", t.cfg.checkpoint)
    assert [s for s, _ in done.complete()] == [2, 3]
    assert done.verify(done.latest(), CheckpointManager.load(done.latest())) > 0
