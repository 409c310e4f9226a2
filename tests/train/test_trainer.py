"""The trainer end to end on the test model: learning, exact resume, kill-and-resume, config checks, NaN handling."""

import json
import os
import signal
import sys
import time

import pytest
import torch

from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.config import ConfigError, load_config
from mhc_train.train.metrics import read_metrics
from mhc_train.train.trainer import Trainer, TrainingError
from tests.support import launch, runs
from tests.support.configs import run_overrides
from tests.support.logs import collect_progress


def _cli(overrides, env_extra=None, entry=None):
    """`mhc-train train` (or `python -m <entry...> train`, e.g. a wrapper that patches the save) in the background."""
    cmd = launch.cli_cmd("train", *overrides) if entry is None else [sys.executable, "-m", *entry, "train", *overrides]
    return launch.launch(cmd, **(env_extra or {}))


def _run_cli(overrides, timeout=240):
    p = _cli(overrides)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out
    return out


def test_tiny_run_learns(prepared_data, tmp_path):
    cfg = load_config(
        run_overrides(
            prepared_data,
            tmp_path / "r",
            **{"train.max_steps": 40, "optim.lr": 1e-2, "train.eval_every": 20, "connection": "mhc"},
        )
    )
    summary = Trainer(cfg).run()
    val = [r["loss"] for r in read_metrics(tmp_path / "r")["val"]]
    print("val losses", val, "tokens/s", summary["tokens_per_s"])
    assert val[-1] < val[0] - 0.5  # from ~ln(512) = 6.2 down
    recs = read_metrics(tmp_path / "r")
    diag = recs["diag"][-1]
    assert len(diag["sites"]) == 4 and diag["sinkhorn_col_err_max"] < 1e-3
    assert set(diag["grad_norms"]) >= {"global", "layer0", "layer1", "tok_embeddings", "output"}
    assert all("clipped" in r and "grad_norm" in r for r in recs["train"])


@pytest.mark.slow
def test_resume_is_bit_exact_across_a_process_restart(prepared_data, tmp_path):
    """2k steps in one process == k steps, a new process, k more steps: loss for loss, bit for bit, and weights."""
    common = {"train.max_steps": 8, "checkpoint.every": 0, "connection": "mhc"}
    _run_cli(run_overrides(prepared_data, tmp_path / "full", **common))
    _run_cli(run_overrides(prepared_data, tmp_path / "split", **common, **{"train.stop_at_step": 4}))
    assert max(runs.losses_by_step(tmp_path / "split")) == 4
    out = _run_cli(run_overrides(prepared_data, tmp_path / "split", **common))
    assert "resumed from" in out and "step_00000004.pt" in out
    full, split = runs.losses_by_step(tmp_path / "full"), runs.losses_by_step(tmp_path / "split")
    assert full.keys() == split.keys() == set(range(1, 9))
    for step in full:
        assert full[step] == split[step], f"step {step}: {full[step]!r} != {split[step]!r}"
    a = torch.load(tmp_path / "full/checkpoints/step_00000008.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split/checkpoints/step_00000008.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


@pytest.mark.slow
def test_dcp_checkpoint_resumes_exactly_and_a_broken_one_is_named(prepared_data, tmp_path):
    """checkpoint.format=dcp in one process: the step file holds no weights, the DCP directory does; resume is bit
    exact; an incomplete DCP directory stops the resume with a message naming it and the fix."""
    from mhc_train.checkpoint import read_model_state

    common = {"train.max_steps": 6, "checkpoint.every": 0, "connection": "hc", "checkpoint.format": "dcp"}
    _run_cli(run_overrides(prepared_data, tmp_path / "full", **common))
    _run_cli(run_overrides(prepared_data, tmp_path / "split", **common, **{"train.stop_at_step": 3}))
    step3 = tmp_path / "split/checkpoints/step_00000003.pt"
    assert "model" not in torch.load(step3, weights_only=False)
    assert (tmp_path / "split/checkpoints/dcp/step_00000003/.metadata").is_file()
    out = _run_cli(run_overrides(prepared_data, tmp_path / "split", **common))
    assert "resumed from" in out
    assert runs.losses_by_step(tmp_path / "full") == runs.losses_by_step(tmp_path / "split")
    a = read_model_state(tmp_path / "full/checkpoints/step_00000006.pt")
    b = read_model_state(tmp_path / "split/checkpoints/step_00000006.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (tmp_path / "split/checkpoints/dcp/step_00000006/.metadata").unlink()
    step6 = tmp_path / "split/checkpoints/step_00000006.pt"
    explicit = {**common, "train.max_steps": 8, "checkpoint.resume": str(step6)}
    with pytest.raises(CheckpointError, match=r"shard .*dcp/step_00000006/.metadata is missing"):
        Trainer(load_config(run_overrides(prepared_data, tmp_path / "split", **explicit)))
    # auto: the incomplete checkpoint is moved aside (kept) and the run resumes from the previous one, naming both
    cfg = load_config(run_overrides(prepared_data, tmp_path / "split", **{**common, "train.max_steps": 8}))
    with collect_progress() as lines:
        t = Trainer(cfg)
    t.close()
    logs = lines.messages
    assert t.step == 3, logs
    text = "\n".join(logs)
    assert "step_00000006/.metadata is missing" in text and "resuming from" in text and "step_00000003.pt" in text
    assert (tmp_path / "split/checkpoints/damaged/step_00000006.pt").is_file()
    assert (tmp_path / "split/checkpoints/damaged/dcp/step_00000006").is_dir()


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_resumes_from_newest_complete(prepared_data, tmp_path):
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    common = {"train.max_steps": 8, "checkpoint.every": 1, "checkpoint.keep_last": 3, "connection": "hc"}
    _run_cli(run_overrides(prepared_data, ref, **common))
    p = _cli(run_overrides(prepared_data, victim, **common), entry=("tests.checkpoint.paused_save", "1.5"))
    ckpt_dir, deadline = victim / "checkpoints", time.time() + 180
    while time.time() < deadline:  # wait until the step-3 checkpoint is being written (temporary file on disk)
        if ckpt_dir.is_dir() and any(f.name.startswith(".step_00000003.pt.tmp") for f in ckpt_dir.iterdir()):
            break
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail("the run never reached its third checkpoint")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    complete = [
        s for s, _ in CheckpointManager(victim, load_config(run_overrides(prepared_data, victim)).checkpoint).complete()
    ]
    assert complete == [1, 2], complete  # the half-written step 3 is not listed
    for s in complete:
        CheckpointManager.load(ckpt_dir / f"step_{s:08d}.pt")  # each complete checkpoint loads
    out = _run_cli(run_overrides(prepared_data, victim, **common))
    assert "resumed from" in out and "step_00000002.pt" in out
    assert not any(f.name.startswith(".") for f in ckpt_dir.iterdir()), "stale temporary left behind"
    ref_l, vic_l = runs.losses_by_step(ref), runs.losses_by_step(victim)
    assert all(ref_l[s] == vic_l[s] for s in ref_l), (ref_l, vic_l)


def test_resume_with_a_changed_model_fails_listing_keys(prepared_data, tmp_path):
    run = tmp_path / "r"
    Trainer(load_config(run_overrides(prepared_data, run, **{"train.max_steps": 2}))).run()
    bad = run_overrides(prepared_data, run, **{"train.max_steps": 4, "connection": "hc", "model.dim": 48})
    with pytest.raises(CheckpointError) as e:
        Trainer(load_config(bad))
    msg = str(e.value)
    assert "connection.type: 'mhc' -> 'hc'" in msg and "model.dim: 32 -> 48" in msg and "train.max_steps" not in msg
    ok = run_overrides(prepared_data, run, **{"train.max_steps": 4, "optim.lr": 1e-3})
    with collect_progress() as lines:
        t = Trainer(load_config(ok))
    logs = lines.messages
    assert t.step == 2
    assert any("optim.lr: 0.003 -> 0.001" in line for line in logs)
    assert any("train.max_steps: 2 -> 4" in line for line in logs)


def test_corrupt_checkpoint_is_reported(prepared_data, tmp_path):
    run = tmp_path / "r"
    Trainer(load_config(run_overrides(prepared_data, run, **{"train.max_steps": 2}))).run()
    ckpt = run / "checkpoints" / "step_00000002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_00000002.pt has no integrity footer.*checkpoint.verify=false"):
        Trainer(load_config(run_overrides(prepared_data, run, **{"train.max_steps": 4})))


def test_nonfinite_loss_stops_naming_step_and_checkpoint(prepared_data, tmp_path):
    cfg = load_config(run_overrides(prepared_data, tmp_path / "r", **{"train.max_steps": 6, "checkpoint.every": 2}))
    t = Trainer(cfg)
    orig = t.engine.forward_backward

    def poisoned(batch):
        loss = orig(batch)
        return float("nan") if t.step == 3 else loss

    t.engine.forward_backward = poisoned
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4.*step_00000002.pt.*skip_nonfinite"):
        t.run()
    cfg.train.skip_nonfinite = True
    cfg.run_dir = str(tmp_path / "skip")
    t = Trainer(cfg)
    orig = t.engine.forward_backward
    t.engine.forward_backward = poisoned
    summary = t.run()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 6


def test_config_typos_and_types_fail_naming_the_key(prepared_data, tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(["+trian.max_steps=3"])
    with pytest.raises(ConfigError, match="max_stpes"):
        load_config(["train.max_stpes=3"])
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"train.seq_len=512 is invalid: must be <= model.max_seq_len=64"):
        load_config(["model=test", "train.seq_len=512"])
    with pytest.raises(ConfigError, match=r"connection.type='dense'"):
        load_config(["connection.type=dense"])
    with pytest.raises(ConfigError, match="connection"):
        load_config(["connection=nonexistent_arm"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  bacth_size: 4\n")
    with pytest.raises(ConfigError, match="bacth_size"):
        load_config([], config_file=str(bad_yaml))


def test_wandb_offline_creates_run_directory(prepared_data, tmp_path):
    run = tmp_path / "r"
    cfg = load_config(run_overrides(prepared_data, run, **{"train.max_steps": 2, "logging.wandb": "true"}))
    Trainer(cfg).run()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, list(run.rglob("*"))
    assert (run / "metrics.jsonl").is_file()


def test_checkpoint_retention_keeps_last_and_milestones(prepared_data, tmp_path):
    run = tmp_path / "r"
    cfg = load_config(
        run_overrides(
            prepared_data,
            run,
            **{"train.max_steps": 6, "checkpoint.every": 1, "checkpoint.keep_last": 2, "checkpoint.milestones": "[2]"},
        )
    )
    Trainer(cfg).run()
    assert [s for s, _ in CheckpointManager(run, cfg.checkpoint).complete()] == [2, 5, 6]
    state = CheckpointManager.load(run / "checkpoints" / "step_00000006.pt")
    assert {"model", "optimizer", "scheduler", "rng", "data", "config", "tokenizer"} <= set(state)
    assert (
        state["tokenizer"]["sha256"] == json.loads((prepared_data / "manifest.json").read_text())["tokenizer"]["sha256"]
    )


PIPELINE_ERRORS = [
    (["parallel.pp=2", "parallel.engine=deepspeed"], r"parallel.engine='deepspeed'.*set parallel.engine=none"),
    (["parallel.pp=2", "parallel.engine=ddp"], r"parallel.engine='ddp'.*set parallel.engine=fsdp"),
    (["parallel.engine=deepspeed", "checkpoint.format=dcp"], r"checkpoint.format='dcp'.*writes its own sharded"),
    (
        ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "parallel.pp_microbatches=2"],
        r"parallel.pp_microbatches=2.*at least 4 micro-batches",
    ),
    (["parallel.pp=3"], r"parallel.pp=3.*n_layer=4 divisible by its 3 stages"),
    (["parallel.pp=2", "parallel.pp_schedule=csv"], r"parallel.pp_schedule_csv=''.*needs the path"),
    (
        ["parallel.pp=2", "parallel.pp_schedule=csv", "parallel.pp_schedule_csv=/nonexistent.csv"],
        r"cannot read the schedule file '/nonexistent.csv'",
    ),
    (
        ["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "parallel.pp_stages_per_rank=3"],
        r"n_layer=4 divisible by its 6 stages",
    ),
    (["parallel.pp=2", "parallel.pp_schedule=zbv", "train.compile=true"], r"train.compile=True.*refuses compiled"),
    (["parallel.pp_schedule=gpipe"], r"parallel.pp_schedule='gpipe'.*1f1b, zbv, dualpipev"),
]


@pytest.mark.parametrize("overrides,pattern", PIPELINE_ERRORS, ids=[o[-1] for o, _ in PIPELINE_ERRORS])
def test_bad_parallel_combinations_fail_before_any_process_group(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(["model=test", "model.n_layer=4", "train=test", "train.batch_size=8", *overrides])


def test_world_size_checks(monkeypatch):
    from mhc_train.config import validate_world

    cfg = load_config(["model=test", "train=test", "train.batch_size=8", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="4 ranks with pp=2 make 2 pipeline replicas: set parallel.engine=fsdp"):
        validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="3 ranks were launched: launch a multiple of pp=2"):
        validate_world(cfg, 3)
    cfg = load_config(["model=test", "train=test", "train.batch_size=4", "parallel.pp=2", "parallel.engine=fsdp"])
    with pytest.raises(ConfigError, match="train.batch_size=4.*2 pipeline replicas x 4 micro-batches"):
        validate_world(cfg, 4)
    validate_world(cfg, 2)  # one replica: 4 micro-batches of 1
    cfg = load_config(["model=test", "train=test", "train.batch_size=6"])
    with pytest.raises(ConfigError, match="set parallel.engine=ddp, fsdp or deepspeed"):
        validate_world(cfg, 2)
    cfg = load_config(["model=test", "train=test", "train.batch_size=6", "parallel.engine=ddp"])
    with pytest.raises(ConfigError, match="split evenly over 4 data-parallel ranks"):
        validate_world(cfg, 4)


def _host_reads_in_run(prepared_data, run, steps: int, monkeypatch) -> int:
    """Tensor-to-host reads (item, tolist, float/int/bool of a tensor) outside torch.optim over a whole run of `steps` steps that logs,
    evaluates and checkpoints only at its start and end."""
    overrides = {"train.max_steps": steps, "train.log_every": 1000, "train.eval_every": 1000, "train.diag_every": 0}
    t = Trainer(load_config(run_overrides(prepared_data, run, **overrides, **{"checkpoint.every": 0})))
    count = [0]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            # torch.optim's single-tensor AdamW reads its own step counter, a CPU scalar even on CUDA (and the
            # fused CUDA AdamW never reads it): not a device sync
            count[0] += f"{os.sep}optim{os.sep}" not in caller
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    t.run()
    monkeypatch.undo()
    return count[0]


def test_a_training_step_reads_the_device_once(prepared_data, tmp_path, monkeypatch):
    """On CUDA every host read of a device tensor waits for the GPU. A step reads its loss and the stop flag together
    (one read); the grad norm is read on log steps only and the step ends without a synchronize. Counted as the
    difference between a 6-step and a 3-step run with the same start and end (logs, eval, final checkpoint)."""
    short = _host_reads_in_run(prepared_data, tmp_path / "short", 3, monkeypatch)
    long = _host_reads_in_run(prepared_data, tmp_path / "long", 6, monkeypatch)
    assert (long - short) / 3 == 1, (short, long)
