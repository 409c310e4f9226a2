"""Asynchronous DCP saves in one process (`checkpoint.async_save`): the checkpoint equals a synchronous one (the
staged copy is a snapshot: training goes on while it is written), a damaged shard of it is caught, and a write that
fails leaves no step file, so the previous checkpoint stays the resume point (retention deleted nothing); a
preemption commits the save in flight before it names it. The 2-rank
FSDP run, resumed bit-exactly, is tests/checkpoint/test_async_resume.py."""

from __future__ import annotations

import pytest
import torch

from mhc_train.checkpoint import CheckpointError, CheckpointManager, read_model_state
from mhc_train.config import load_config
from mhc_train.train.trainer import Trainer
from tests.support.configs import run_overrides

COMMON = {"train.max_steps": 4, "checkpoint.every": 2, "checkpoint.format": "dcp", "connection": "mhc"}


def _run(data, run_dir, **extra) -> Trainer:
    t = Trainer(load_config(run_overrides(data, run_dir, **COMMON, **extra)))
    t.run()
    return t


def test_async_equals_sync_and_a_damaged_shard_is_caught(prepared_data, tmp_path):
    _run(prepared_data, tmp_path / "sync")
    _run(prepared_data, tmp_path / "async", **{"checkpoint.async_save": "true"})
    for step in (2, 4):  # step 2 was written while steps 3-4 trained: the staged copy is a snapshot
        want = read_model_state(tmp_path / "sync" / f"checkpoints/step_{step:08d}.pt")
        got = read_model_state(tmp_path / "async" / f"checkpoints/step_{step:08d}.pt")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), step
    step_file = tmp_path / "async" / "checkpoints/step_00000004.pt"
    state = CheckpointManager.load(step_file)
    assert state["step"] == 4 and state["shards"]["files"], state.get("shards")
    manager = CheckpointManager(tmp_path / "async", load_config(run_overrides(prepared_data, tmp_path)).checkpoint)
    shard = next(step_file.parent.glob("dcp/step_00000004/__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is damaged"):
        manager.verify(step_file, state)


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
    assert done.verify(done.latest(), state) > 0


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
