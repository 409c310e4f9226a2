"""Runs never lose or corrupt data: verified checkpoints with fallback, one owner per run directory, graceful
preemption, honest resume, self-contained run directories. Real subprocesses where a process boundary matters."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from mhc_train.checkpoint import CheckpointError, CheckpointManager, CorruptCheckpoint, read_model_state
from mhc_train.checkpoint import integrity as ckpt_integrity
from mhc_train.checkpoint.errors import UnverifiableCheckpoint
from mhc_train.config import load_config
from mhc_train.optim import lr_multiplier
from mhc_train.train.metrics import read_metrics
from mhc_train.train.trainer import Trainer, TrainingError
from tests.support import launch, runs
from tests.support.configs import run_overrides
from tests.support.logs import collect_progress

QUIET = {"train.eval_every": 1000, "train.diag_every": 0}


def _train(prepared_data, run, logs=None, **overrides) -> Trainer:
    """Train one run; the trainer's log lines are appended to `logs` (also when the run fails)."""
    with collect_progress() as lines:
        try:
            t = Trainer(load_config(run_overrides(prepared_data, run, **overrides)))
            t.run()
        finally:
            if logs is not None:
                logs.extend(lines.messages)
    return t


def _damage(path: Path, offset: int, n: int = 16) -> bytes:
    """XOR n bytes at `offset` with non-zero values (so every byte changes); returns the original bytes."""
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) - n)
    original = bytes(data[offset : offset + n])
    for i in range(n):
        data[offset + i] ^= 1 + (i * 37) % 255
    path.write_bytes(bytes(data))
    return original


def _restore(path: Path, offset: int, original: bytes) -> None:
    data = bytearray(path.read_bytes())
    offset = min(offset, len(data) - len(original))
    data[offset : offset + len(original)] = original
    path.write_bytes(bytes(data))


def test_damage_anywhere_in_a_checkpoint_or_a_dcp_shard_is_detected(prepared_data, tmp_path):
    rng = random.Random(0)
    _train(prepared_data, tmp_path / "file", **QUIET, **{"train.max_steps": 2})
    step = tmp_path / "file/checkpoints/step_00000002.pt"
    size = step.stat().st_size
    for offset in [rng.randrange(size) for _ in range(20)]:
        original = _damage(step, offset)
        with pytest.raises(CorruptCheckpoint, match="step_00000002.pt"):
            CheckpointManager.load(step)
        _restore(step, offset, original)
    CheckpointManager.load(step)  # intact again

    _train(prepared_data, tmp_path / "dcp", **QUIET, **{"train.max_steps": 2, "checkpoint.format": "dcp"})
    step = tmp_path / "dcp/checkpoints/step_00000002.pt"
    state = CheckpointManager.load(step)
    assert state["shards"]["files"], "a DCP step file lists its shards' digests"
    manager = CheckpointManager(tmp_path / "dcp", load_config(run_overrides(prepared_data, tmp_path)).checkpoint)
    shards = sorted(p for p in (tmp_path / "dcp/checkpoints/dcp/step_00000002").rglob("*") if p.is_file())
    for _ in range(20):
        shard = rng.choice(shards)
        offset = rng.randrange(shard.stat().st_size)
        original = _damage(shard, offset, n=min(16, shard.stat().st_size))
        with pytest.raises(CheckpointError, match=re.escape(shard.name)):
            manager.verify(step, state)
        _restore(shard, offset, original)
    assert manager.verify(step, state) > 0


def test_auto_resume_moves_a_damaged_checkpoint_aside_and_continues_bit_exact(prepared_data, tmp_path):
    common = {**QUIET, "train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 3, "connection": "hc"}
    _train(prepared_data, tmp_path / "full", **common)
    split = tmp_path / "split"
    _train(prepared_data, split, **common, **{"train.stop_at_step": 4})
    step4 = split / "checkpoints/step_00000004.pt"
    _damage(step4, step4.stat().st_size // 2, n=256)
    logs = []
    t = _train(prepared_data, split, logs, **common)
    text = "\n".join(logs)
    assert "step_00000004.pt is damaged" in text and "moved it aside" in text, text
    assert "resuming from" in text and "step_00000002.pt" in text and "resumed from" in text, text
    assert (split / "checkpoints/damaged/step_00000004.pt").is_file()  # kept, never deleted
    assert re.search(r"verified step_00000002.pt: [\d.,]+ MiB in [\d.]+ s \([\d,]+ MiB/s", text), text
    assert t.step == 6
    full, resumed = runs.losses_by_step(tmp_path / "full"), runs.losses_by_step(split)
    assert all(full[s] == resumed[s] for s in range(3, 7)), (full, resumed)
    a = read_model_state(tmp_path / "full/checkpoints/step_00000006.pt")
    b = read_model_state(split / "checkpoints/step_00000006.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_explicit_damaged_checkpoint_is_refused_not_replaced(prepared_data, tmp_path):
    run = tmp_path / "r"
    _train(prepared_data, run, **QUIET, **{"train.max_steps": 4, "checkpoint.every": 2})
    step4 = run / "checkpoints/step_00000004.pt"
    _damage(step4, 100)
    cfg = load_config(run_overrides(prepared_data, run, **{"train.max_steps": 6, "checkpoint.resume": str(step4)}))
    with pytest.raises(CorruptCheckpoint, match="step_00000004.pt is damaged"):
        Trainer(cfg)
    assert step4.is_file()  # an explicit choice is not moved


def test_retention_never_removes_the_newest_verified_checkpoint(prepared_data, tmp_path, monkeypatch):
    run = tmp_path / "r"
    common = {**QUIET, "train.max_steps": 2, "checkpoint.every": 1, "checkpoint.keep_last": 1}
    _train(prepared_data, run, **common)
    assert [
        s for s, _ in CheckpointManager(run, load_config(run_overrides(prepared_data, run)).checkpoint).complete()
    ] == [2]

    def bad_footer(path):  # the next write lands damaged on disk
        with open(path, "ab") as f:
            f.write(ckpt_integrity.MAGIC + b"\0" * 32 + (path.stat().st_size).to_bytes(8, "little"))

    monkeypatch.setattr(ckpt_integrity, "append_footer", bad_footer)
    with pytest.raises(CheckpointError, match="step_00000003.pt"):
        _train(prepared_data, run, **{**common, "train.max_steps": 3})
    assert (run / "checkpoints/step_00000002.pt").is_file()  # keep_last=1, yet the verified one survives


def test_a_fresh_start_never_overwrites_another_run(prepared_data, tmp_path):
    run = tmp_path / "r"
    _train(prepared_data, run, **QUIET, **{"train.max_steps": 2})
    before = (run / "metrics.jsonl").read_text()
    cfg = load_config(run_overrides(prepared_data, run, **{"train.max_steps": 2, "checkpoint.resume": "never"}))
    with pytest.raises(TrainingError, match=r"already holds a run .*another run_dir.*checkpoint.overwrite=true"):
        Trainer(cfg)
    assert (run / "metrics.jsonl").read_text() == before and (run / "checkpoints/step_00000002.pt").is_file()
    logs = []
    _train(
        prepared_data,
        run,
        logs,
        **QUIET,
        **{"train.max_steps": 2, "checkpoint.resume": "never", "checkpoint.overwrite": "true"},
    )
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and any(str(aside[0]) in line for line in logs)
    assert (aside[0] / "metrics.jsonl").read_text() == before  # the old run, whole
    assert (aside[0] / "checkpoints/step_00000002.pt").is_file()
    assert [r["segment"] for r in read_metrics(run, segments=True)["meta"]] == [1]  # a new lineage


def test_changed_hyperparameters_take_effect_on_resume(prepared_data, tmp_path):
    run = tmp_path / "r"
    common = {**QUIET, "train.max_steps": 4, "checkpoint.every": 2}
    _train(prepared_data, run, **common, **{"train.stop_at_step": 2})
    logs = []
    changed = {"optim.lr": 1e-3, "optim.weight_decay": 0.0, "optim.grad_clip": 0.5}
    t = _train(prepared_data, run, logs, **common, **changed)
    assert any("optim.lr: 0.003 -> 0.001" in line for line in logs)
    sched = load_config(run_overrides(prepared_data, run, **common)).schedule
    lrs = {r["step"]: r["lr"] for r in read_metrics(run)["train"]}
    assert lrs[3] == pytest.approx(1e-3 * lr_multiplier(2, 4, sched), rel=1e-12), lrs  # the LR used at step 3
    assert lrs[1] == pytest.approx(3e-3 * lr_multiplier(0, 4, sched), rel=1e-12)  # the old segment keeps its own
    assert all(g["weight_decay"] == 0.0 for g in t.engine.optimizer.param_groups)
    assert t.engine.grad_clip == 0.5
    clipped = {r["step"]: r["clipped"] for r in read_metrics(run)["train"]}
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(run)["train"]}
    assert clipped[3] == (norms[3] > 0.5)


def test_a_run_dir_is_self_contained_and_keeps_its_lineage(prepared_data, tmp_path):
    run = tmp_path / "r"
    common = {**QUIET, "train.max_steps": 4, "checkpoint.every": 2}
    _train(prepared_data, run, **common)
    cfg = load_config(run_overrides(prepared_data, run))
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run / "config.yaml")
    assert saved.train.max_steps == 4 and saved.run_dir == str(run)
    tok = Path(torch.load(run / "checkpoints/step_00000004.pt", weights_only=False)["tokenizer"]["path"])
    assert (run / "tokenizer.model").read_bytes() == tok.read_bytes()
    # a launch that re-logs steps (its checkpoint was older than the last record) is a new segment, and says so
    (run / "checkpoints/step_00000004.pt").unlink()
    shutil.rmtree(run / "checkpoints/dcp", ignore_errors=True)
    assert cfg.checkpoint.resume == "auto"
    _train(prepared_data, run, **common)
    with pytest.warns(UserWarning, match=r"segment 2 replaces \d+ record\(s\) of segment 1 at steps 3-4"):
        latest = read_metrics(run)
    assert [r["segment"] for r in latest["train"]] == [1, 1, 2, 2]
    every = read_metrics(run, segments=True)["train"]
    assert [(r["segment"], r["step"]) for r in every] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4)]


def test_a_data_error_leaves_no_run_directory(prepared_data, tmp_path):
    run = tmp_path / "never_created"
    overrides = run_overrides(tmp_path / "no_data", run, **{"data.source": str(tmp_path / "missing.txt")})
    with pytest.raises(Exception, match="missing.txt"):
        Trainer(load_config(overrides))
    assert not run.exists()


def test_the_nonfinite_message_names_real_keys(prepared_data, tmp_path):
    t = Trainer(load_config(run_overrides(prepared_data, tmp_path / "r", **QUIET)))
    t.engine.forward_backward = lambda batch: float("nan")
    with pytest.raises(TrainingError, match=r"schedule.warmup_steps") as e:
        t.run()
    assert "optim.warmup " not in str(e.value)
    for key in re.findall(r"\b(?:optim|schedule|train)\.[a-z_]+", str(e.value)):
        group, name = key.split(".")
        assert hasattr(getattr(t.cfg, group), name), key


# ---- process boundaries -----------------------------------------------------------------------------------------
LONG = {**QUIET, "train.max_steps": 100000, "checkpoint.every": 0, "checkpoint.save_final": "true"}


@pytest.mark.slow
def test_one_owner_per_run_dir_and_a_killed_owner_is_taken_over(prepared_data, tmp_path):
    run = tmp_path / "r"
    first = launch.launch(launch.cli_cmd("train", *run_overrides(prepared_data, run, **LONG)))
    runs.wait_for_step(first, run, 1)
    second = subprocess.run(
        launch.cli_cmd("train", *run_overrides(prepared_data, run, **{**LONG, "train.max_steps": 2})),
        cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 2, second.stdout + second.stderr
    assert re.search(rf"run_dir {re.escape(str(run))} is in use by PID {first.pid} on host \S+", second.stderr)
    assert second.stderr.count("\n") <= 2, second.stderr  # one line, no traceback
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    third = subprocess.run(
        launch.cli_cmd("train", *run_overrides(prepared_data, run, **{**QUIET, "train.max_steps": 2, "checkpoint.resume": "auto"})),
        cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr  # the dead owner's lock is free: taken over


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(prepared_data, tmp_path, sig, code):
    run = tmp_path / "r"
    proc = launch.launch(launch.cli_cmd("train", *run_overrides(prepared_data, run, **LONG)))
    runs.wait_for_step(proc, run, 2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    m = re.search(
        r"at step (\d+): wrote checkpoint (\S+step_(\d{8})\.pt)\. To resume, relaunch python -m mhc_train", out
    )
    assert m and int(m.group(1)) == int(m.group(3)) >= 2, out
    assert "Traceback" not in out, out
    assert Path(m.group(2)).is_file()
    CheckpointManager.load(m.group(2))  # complete and verified
    step = int(m.group(1))
    resumed = subprocess.run(
        launch.cli_cmd("train", *run_overrides(prepared_data, run, **{**LONG, "train.max_steps": step + 1})),
        cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0 and f"resumed from {m.group(2)} at step {step}" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_every_rank(prepared_data, tmp_path):
    run = tmp_path / "r"
    overrides = run_overrides(prepared_data, run, **{**LONG, "parallel.engine": "ddp", "checkpoint.format": "dcp"})
    proc = launch.launch(launch.torchrun_cmd(overrides))
    runs.wait_for_step(proc, run, 2, timeout=240)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends torchrun; it forwards it to every worker
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    m = re.search(r"SIGTERM at step (\d+): wrote checkpoint (\S+\.pt)\. To resume, relaunch the same torchrun", out)
    assert m, out
    state = CheckpointManager.load(m.group(2))
    assert state["world_size"] == 2 and state["step"] == int(m.group(1))
    manager = CheckpointManager(run, load_config(run_overrides(prepared_data, run)).checkpoint)
    assert manager.verify(Path(m.group(2)), state) > 0  # both ranks' DCP shards are complete


def test_resuming_an_older_checkpoint_moves_the_newer_timeline_aside(prepared_data, tmp_path):
    run = tmp_path / "r"
    common = {**QUIET, "train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 2}
    _train(prepared_data, run, **common)  # keeps steps 4 and 6
    step4 = run / "checkpoints/step_00000004.pt"
    logs = []
    _train(
        prepared_data,
        run,
        logs,
        **{**common, "checkpoint.resume": str(step4), "train.max_steps": 5, "checkpoint.every": 5},
    )
    assert any("moved the newer step_00000006.pt aside" in line for line in logs), logs
    assert (run / "checkpoints/superseded/step_00000006.pt").is_file()
    kept = [s for s, _ in CheckpointManager(run, load_config(run_overrides(prepared_data, run)).checkpoint).complete()]
    assert kept == [4, 5], kept  # the checkpoint just written survives retention; the abandoned one is kept aside


def test_a_checkpoint_without_a_digest_is_refused_not_moved_and_verify_false_loads_it(prepared_data, tmp_path):
    run = tmp_path / "r"
    _train(prepared_data, run, **QUIET, **{"train.max_steps": 2})
    step = run / "checkpoints/step_00000002.pt"
    step.write_bytes(step.read_bytes()[: -ckpt_integrity.FOOTER])  # as written before digests existed
    overrides = {**QUIET, "train.max_steps": 3}
    with pytest.raises(UnverifiableCheckpoint, match="no integrity footer.*checkpoint.verify=false"):
        Trainer(load_config(run_overrides(prepared_data, run, **overrides)))
    assert step.is_file()
    t = _train(prepared_data, run, **overrides, **{"checkpoint.verify": "false"})
    assert t.step == 3


def test_moving_aside_twice_keeps_both_copies(prepared_data, tmp_path):
    run = tmp_path / "r"
    _train(prepared_data, run, **QUIET, **{"train.max_steps": 2})
    manager = CheckpointManager(run, load_config(run_overrides(prepared_data, run)).checkpoint)
    step = run / "checkpoints/step_00000002.pt"
    first = manager.move_aside(step)
    shutil.copy(first, step)
    second = manager.move_aside(step)
    assert first != second and first.is_file() and second.is_file()


def test_a_trainer_dropped_without_run_frees_its_run_dir(prepared_data, tmp_path):
    import gc

    cfg = load_config(run_overrides(prepared_data, tmp_path / "r", **QUIET, **{"train.max_steps": 1}))
    t = Trainer(cfg)
    del t
    gc.collect()
    Trainer(cfg).run()  # no RunDirBusy naming our own PID


def test_train_records_carry_throughput_and_a_step_time_breakdown(prepared_data, tmp_path):
    run = tmp_path / "r"
    _train(prepared_data, run, **QUIET, **{"train.max_steps": 2})
    recs = read_metrics(run)
    meta, train = recs["meta"][-1], recs["train"]
    assert meta["flops_per_token"]["total"] > meta["flops_per_token"]["connection"] > 0 and meta["world_size"] == 1
    for r in train:
        assert set(r["time_per_step_s"]) == {"forward_backward", "data", "optimizer"}, r
        assert 0 < r["time_per_step_s"]["data"] < r["time_per_step_s"]["forward_backward"] <= r["step_time_s"]
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"] and r["mfu"] is None  # no peak known on CPU
