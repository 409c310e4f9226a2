"""The defects a newcomer hit in issue 28's trial, one test each (numbered as in the issue; 6x are the rough edges).

Each test failed on the code before its fix. They stay in one process and share one trained run (two checkpoints of
the test model), so the whole file costs seconds: launches without torchrun are checked in the trainer, disk full is
simulated by patching the step file's write, the compare figure and tables are drawn from runs built in memory.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mhc_train.analysis.plot import plot
from mhc_train.analysis.report import summary_rows
from mhc_train.analysis.stats import seed_statistics
from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.checkpoint import integrity as ckpt_integrity
from mhc_train.checkpoint.formats import FORMATS
from mhc_train.config import ConfigError, DataConfig, load_config
from mhc_train.data import DataError, prepare
from mhc_train.data.shards import verify_shards
from mhc_train.data.store import load_manifest
from mhc_train.infer.errors import InferenceError
from mhc_train.infer.generate import check_context
from mhc_train.parallel import DistInfo
from mhc_train.train.errors import Preempted, TrainingError
from mhc_train.train.metrics import read_metrics
from mhc_train.train.preemption import Preemption
from mhc_train.train.trainer import Trainer
from tests.support.configs import run_overrides
from tests.support.corpora import make_documents, write_jsonl
from tests.support.logs import collect_progress

REPO = Path(__file__).resolve().parents[1]
QUIET = {"train.eval_every": 1000, "train.diag_every": 0, "checkpoint.keep_last": 3}


def _cfg(data, run, **overrides):
    return load_config(run_overrides(data, run, **{**QUIET, "checkpoint.every": 2, **overrides}))


@pytest.fixture(scope="module")
def two_checkpoints(prepared_data, tmp_path_factory) -> Path:
    """A run of the test model with verified checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("d28") / "run"
    Trainer(_cfg(prepared_data, run, **{"train.max_steps": 4})).run()
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# ---- 1: the resume command printed after Ctrl-C --------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,command",
    [
        (["/venv/bin/mhc-train", "train", "model=test"], "mhc-train train model=test"),
        (["/repo/mhc_train/cli.py", "train", "model=test"], "python -m mhc_train.cli train model=test"),
        (["/repo/mhc_train/train/__main__.py", "model=test"], "python -m mhc_train.train model=test"),
    ],
    ids=["console-script", "cli-module", "train-module"],
)
def test_1_the_resume_command_is_the_one_the_user_typed(monkeypatch, argv, command):
    monkeypatch.setattr(sys, "argv", argv)
    preemption = Preemption(DistInfo(), lambda: 3)
    preemption.signals.received = signal.SIGINT
    with pytest.raises(Preempted) as e:
        preemption.stop(3, Path("/r/checkpoints/step_00000003.pt"))
    assert f"To resume, relaunch {command} (checkpoint.resume" in str(e.value), str(e.value)


# ---- 2: compare across different train.eval_every --------------------------------------------------------------------
def _run(arm: str, seed: int, val_steps, loss0: float) -> dict:
    val = [{"step": s, "loss": loss0 - 0.01 * s + 0.001 * seed} for s in val_steps]
    recs = {"val": val, "train": [{"step": s, "loss": v["loss"]} for s, v in zip(val_steps, val)], "meta": [{}]}
    summary = {"final_val_loss": val[-1]["loss"], "tokens_per_s": 100.0}
    conn = arm.split("_")[0]
    return {"dir": Path(f"/runs/{arm}_s{seed}"), "recs": recs, "summary": summary, "connection": conn, "arm": arm,
            "seed": seed, "lr": 1e-3, "eval": {}}  # fmt: skip


@pytest.mark.parametrize("mhc_steps", [[6, 12, 18], [6, 18]], ids=["a-shared-step", "no-shared-step"])
def test_2_compare_keeps_an_arm_whose_val_steps_differ(mhc_steps):
    runs = [_run("residual", s, [4, 8, 12, 16], 5.0) for s in (0, 1)]  # eval_every 4, 18 steps
    runs += [_run("mhc", s, mhc_steps, 4.9) for s in (0, 1)]  # eval_every 6
    stats = seed_statistics(runs)
    arms = {r["arm"]: r for r in stats["per_lr"]}
    assert set(arms) == {"residual", "mhc"} and all(len(r["seeds"]) == 2 for r in arms.values()), stats
    assert arms["mhc"]["vs_residual"]["n"] == 2, arms["mhc"]
    assert any(r["arm"] == "mhc" and r["vs_residual"]["n"] == 2 for r in stats["best_lr"]), stats["best_lr"]
    assert all(row["final_val_loss"] is not None for row in summary_rows(runs, stats["step"])), "an arm shows -"
    if len(mhc_steps) == 3:
        assert stats["step"] == 12, stats["step"]  # the last val step every run logged, taken exactly
    else:
        assert any("share no val step" in n for n in stats["notes"]), stats["notes"]


# ---- 3: a data-parallel preset without torchrun ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["ddp", "fsdp", "zero2"])
def test_3_a_data_parallel_preset_without_torchrun_is_one_clear_line(prepared_data, tmp_path, monkeypatch, preset):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = _cfg(prepared_data, tmp_path / "r", parallel=preset)
    with pytest.raises(ConfigError, match=r"parallel.engine='\w+' is invalid: needs a distributed launch.*torchrun"):
        Trainer(cfg)
    assert not (tmp_path / "r").exists()  # refused before anything was written


# ---- 4: a damaged newest checkpoint falls back to the older one ------------------------------------------------
def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _flip(offset: int):
    def damage(f: Path) -> None:
        raw = bytearray(f.read_bytes())
        raw[offset] ^= 0xA5
        f.write_bytes(bytes(raw))

    return damage


F = ckpt_integrity.FOOTER
DAMAGES = {"truncated": _truncate, "emptied": _empty, "footer-magic": _flip(-F), "footer-digest": _flip(-F + 12)}
# 10 byte offsets over the file: the zip's head, its middle and end, and every field of the footer (length included)
DAMAGES.update({f"byte{o}": _flip(o) for o in (0, 40, 5000, -F - 100, -F - 1, -F + 3, -9, -8, -4, -1)})


def test_4_a_damaged_newest_checkpoint_falls_back_to_the_older_one_that_verifies(two_checkpoints, tmp_path):
    for name, damage in DAMAGES.items():
        run = _copy(two_checkpoints, tmp_path / name)
        newest = run / "checkpoints/step_00000004.pt"
        damage(newest)
        manager = CheckpointManager(run, _cfg(two_checkpoints.parent, run).checkpoint)
        path, notes = manager.choose("auto")
        assert path is not None and path.name == "step_00000002.pt", (name, notes)
        assert any(str(newest) in n and "moved it aside" in n for n in notes), (name, notes)  # the warning names it
        assert (run / "checkpoints/damaged/step_00000004.pt").is_file() and not newest.exists(), name


def test_4_the_trainer_resumes_past_a_truncated_checkpoint(prepared_data, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "r")
    _truncate(run / "checkpoints/step_00000004.pt")
    with collect_progress() as log:
        t = Trainer(_cfg(prepared_data, run, **{"train.max_steps": 5}))
    t.close()
    assert t.step == 2, log.messages
    assert any("step_00000004.pt has no integrity footer" in m for m in log.messages), log.messages


# ---- 5: disk full while checkpointing ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*segment")  # the relaunch logs steps 5-6 again, as a resumed run does
def test_5_disk_full_leaves_no_partial_file_and_one_line_naming_path_and_space(
    prepared_data, two_checkpoints, tmp_path, monkeypatch
):
    run = _copy(two_checkpoints, tmp_path / "r")
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):  # writes part of the file, then the device is full
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    t = Trainer(_cfg(prepared_data, run, **{"train.max_steps": 6}))  # resumes at step 4
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        t.run()
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"no space left .*step_00000006\.pt.*needs about [\d.]+ MiB", msg), msg
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000004.pt"], names  # no partial file, nothing older removed
    CheckpointManager.load(run / "checkpoints/step_00000004.pt")  # intact and verified
    assert [r["step"] for r in read_metrics(run)["train"]][-2:] == [5, 6]  # the steps trained are logged
    t = Trainer(_cfg(prepared_data, run, **{"train.max_steps": 6}))  # the relaunch once space is back
    assert t.step == 4
    t.run()
    assert (run / "checkpoints/step_00000006.pt").is_file()


def test_5_disk_full_anywhere_else_is_one_line_from_the_cli(monkeypatch, capsys):
    from mhc_train import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/metrics.jsonl")

    monkeypatch.setattr(cli, "cmd_compare", full)
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", "a", "--out", "b"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no space left" in err and "/runs/r/metrics.jsonl" in err


# ---- 6: rough edges ----------------------------------------------------------------------------------------------
def test_6_prepare_with_a_model_preset_ignores_the_training_rules(prepared_data, capsys):
    from mhc_train import cli

    cli.main(["prepare", "model=test", f"data.out_dir={prepared_data}"])  # train.seq_len 128 > max_seq_len 64
    assert f"prepared data: {prepared_data}" in capsys.readouterr().out


def test_6_a_deepspeed_checkpoint_resumed_by_another_engine_says_what_to_launch():
    def no_native(directory, tag):
        raise NotImplementedError("torch has no native checkpoint format")

    engine = SimpleNamespace(name="torch", checkpoint_formats=("file", "dcp"), dist=DistInfo(), load_native=no_native)
    state = {"deepspeed_tag": "step_00000002", "world_size": 1}
    with pytest.raises(CheckpointError, match=r"written by DeepSpeed \(parallel.engine=deepspeed\).*parallel=zero"):
        FORMATS["deepspeed"].load(engine, state, Path("/r/checkpoints/step_00000002.pt"))


def test_6_the_advice_for_a_corrupt_data_shard_rebuilds_it(prepared_data, tmp_path):
    tok = load_manifest(prepared_data)["tokenizer"]["path"]
    src = write_jsonl(tmp_path / "c.jsonl", make_documents(60))
    cfg = DataConfig(source=str(src), out_dir=str(tmp_path / "out"), tokenizer_model=tok, vocab_size=512)
    manifest = prepare(cfg)
    shard = Path(manifest["dir"]) / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # same size: only the digest sees it
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        verify_shards(manifest["dir"], manifest, digests=True)
    doomed = re.search(r"delete the prepared directory (\S+) and re-run `mhc-train prepare`", str(e.value))
    assert doomed, str(e.value)
    shutil.rmtree(doomed.group(1))  # follow the advice
    rebuilt = prepare(cfg)
    verify_shards(rebuilt["dir"], rebuilt, digests=True)


@pytest.mark.parametrize("prompt,new", [(10, 100), (70, 8), (70, 100)])
def test_6_generate_past_the_context_never_advises_a_negative_length(prompt, new):
    with pytest.raises(InferenceError) as e:
        check_context([prompt], new, 64)
    assert not re.search(r"at most -?0\b|at most -\d", str(e.value)), str(e.value)
    assert re.search(r"at most \d+|shorten the prompt", str(e.value)), str(e.value)


def test_6_stop_at_step_at_or_before_the_resumed_step_is_refused(prepared_data, two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path / "r")
    with pytest.raises(TrainingError, match=r"train.stop_at_step=2 is not after step 4"):
        Trainer(_cfg(prepared_data, run, **{"train.max_steps": 8, "train.stop_at_step": 2}))


def test_6_compare_png_amax_panels_read_plain_gains_and_paired_series_differ(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    def diag(arm, seed):  # gains a hair above 1.0 (the near-identity init): what made the axis offset
        g = 1.0 + 1e-7 * np.arange(4)
        sites = {f"{i}.{k}": {"composite_bwd_gain": float(g[i])} for i in range(2) for k in ("attn", "ffn")}
        return [{"step": s, "composite_bwd_gain_max": 1.0 + 2e-7 * s, "composite_fwd_gain_max": 1.0 + 1e-7 * s,
                 "h_res_dist_uniform_mean": 0.1 * s, "h_res_dist_identity_mean": 0.2 * s, "sites": sites}
                for s in (2, 4)]  # fmt: skip

    runs = [_run(arm, s, [2, 4], 5.0) for arm in ("residual", "mhc") for s in (0, 1)]
    for r in runs:
        r["recs"]["diag"] = diag(r["arm"], r["seed"])
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **kw: fig.canvas.draw())  # drawn, not encoded
    plot(runs, tmp_path / "compare.png")
    fig = figures[-1]
    axes = fig.axes
    for ax in (axes[4], axes[5]):  # per-site Amax gain, Amax gain over steps
        assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()
        ticks = [float(t.get_text().replace("\u2212", "-")) for t in ax.get_yticklabels() if t.get_text()]
        assert ticks and min(ticks) > 0.5, (ax.get_title(), ticks)
    for ax in (axes[0], axes[5], axes[6]):  # loss val/train, gain bwd/fwd, H_res from J/n / from I
        styles = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
        assert len(styles) == len(set(styles)), (ax.get_title(), styles)
    monkeypatch.undo()
    plt.close(fig)


def test_6_the_dependencies_that_lm_eval_scoring_needs_are_declared():
    text = (REPO / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
    deps = text.split("\ndependencies = [", 1)[1].split("\n]", 1)[0]
    names = {m.lower() for m in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', deps, flags=re.M)}
    assert {"lm-eval", "accelerate"} <= names, names  # lm-eval's `hf` model imports accelerate


def test_6_ddp_is_wrapped_without_a_future_warning(tmp_path):
    import torch.distributed as dist

    from mhc_train.parallel.engine import LocalEngine

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            LocalEngine(model, None, None, DistInfo(), torch.device("cpu"), 1.0, None, 1, ddp=True)
    finally:
        dist.destroy_process_group()


def test_6_an_unreachable_hub_task_is_one_line(monkeypatch):
    from mhc_train.infer import eval as ev

    def offline(**kw):
        try:
            raise OSError("LocalEntryNotFoundError: cannot find the requested files in the local cache")
        except OSError as e:
            raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)") from e

    monkeypatch.setitem(sys.modules, "lm_eval", SimpleNamespace(simple_evaluate=offline))
    monkeypatch.setattr(ev, "_task_manager", lambda tasks, include: None)
    monkeypatch.setattr(ev, "make_lm", lambda scorer, batch_size: None)
    with pytest.raises(InferenceError) as e:
        ev.run_eval(None, ["hellaswag"])
    msg = str(e.value)
    assert "\n" not in msg and "hellaswag" in msg and "Rowan/hellaswag" in msg and "mhc_local_mc" in msg, msg
