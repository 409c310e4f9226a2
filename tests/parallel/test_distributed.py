"""Data parallelism on CPU with gloo under `torchrun --nproc_per_node=2`: DDP and DeepSpeed ZeRO-1/2 match one
process on the same global batch; DP checkpoints resume under DP=2 and in one process; a killed rank takes the job
down with a message and a relaunch continues. Serial, each with a timeout and its own port."""

import json
import re
import signal
import subprocess
import time

import pytest
import torch

from mhc_train.checkpoint import CheckpointManager
from mhc_train.train.metrics import read_metrics
from tests.support import chunked_train, launch, runs
from tests.support.configs import DISTRIBUTED, run_overrides
from tests.support.numerics import assert_close_runs

pytestmark = pytest.mark.slow  # every test launches torchrun (2 or 4 gloo ranks)

COMMON = DISTRIBUTED  # the settings one-process references are shared under (tests/support/configs.py)


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_ddp_matches_single_process(prepared_data, reference_runs, tmp_path, arm):
    ref, dp = reference_runs(connection=arm, **COMMON), tmp_path / "ddp"
    launch.torchrun(prepared_data, dp, connection=arm, **{**COMMON, "parallel.engine": "ddp"})
    assert_close_runs(dp, ref, 3)


@pytest.mark.parametrize("arm,stage", [("mhc", 1), ("mhc", 2), ("mhc", 3), ("residual", 2), ("hc", 2)])
def test_deepspeed_zero_matches_single_process(prepared_data, reference_runs, tmp_path, arm, stage):
    """ZeRO-1/2/3 == one process: losses, every gradient of step 1 (assembled from DeepSpeed's partitions), weights."""
    ref, ds = reference_runs(connection=arm, **COMMON), tmp_path / "ds"
    # ZeRO-3 takes the loss in chunks of 8 tokens (model.chunked_lm_loss; never split at the test model's size)
    module = chunked_train.MODULE if stage == 3 else "mhc_train.train"
    overrides = {**COMMON, "parallel.engine": "deepspeed", "parallel.zero_stage": stage}
    out = launch.torchrun(prepared_data, ds, module=module, connection=arm, **overrides)
    assert_close_runs(ds, ref, 3)
    if stage == 3:
        assert int(re.search(r"chunked loss: (\d+) chunks", out).group(1)) > 0, out[-2000:]


def test_dp_checkpoint_resumes_under_dp2_and_in_one_process(prepared_data, tmp_path):
    common = {**COMMON, "train.max_steps": 4, "parallel.engine": "ddp", "connection": "mhc"}
    full, split, single = tmp_path / "full", tmp_path / "split", tmp_path / "single"
    launch.torchrun(prepared_data, full, **common)
    launch.torchrun(prepared_data, split, **common, **{"train.stop_at_step": 2})
    out = launch.torchrun(prepared_data, split, **common)
    assert "resumed from" in out
    assert runs.losses(full) == runs.losses(split)  # DP=2 resume is exact
    # the DP=2 checkpoint of step 2 continues in a single process (same global batch) to the same result
    runs.copy_checkpoint(split, single, 2)
    out = launch.single(run_overrides(prepared_data, single, **{**common, "parallel.engine": "none"}))
    assert "resumed from" in out and "parallel.engine: 'ddp' -> 'none'" in out
    tail_full, tail_single = runs.losses(full)[2:], runs.losses(single)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(tail_full, tail_single)), (tail_full, tail_single)


def test_killed_rank_stops_the_job_and_resume_continues(prepared_data, tmp_path):
    import psutil

    run = tmp_path / "r"
    common = {**COMMON, "train.max_steps": 60, "checkpoint.every": 1, "parallel.engine": "ddp", "connection": "hc"}
    proc = subprocess.Popen(
        launch.torchrun_cmd(run_overrides(prepared_data, run, **common)),
        cwd=launch.REPO,
        env=launch.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Kill rank 1 as soon as the first checkpoint is complete. Any step_*.pt counts: with checkpoint.every=1 the
    # pruning (keep last K) may already have removed an early one on a fast machine, so never wait on one name.
    deadline = time.time() + 240
    while time.time() < deadline and not list((run / "checkpoints").glob("step_*.pt")):
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read()
        time.sleep(0.02)
    victim = next(
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if c.environ().get("RANK") == "1" and "mhc_train" in " ".join(c.cmdline())
    )
    victim.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "exitcode  : -9" in out or "Signal 9" in out or "SIGKILL" in out, out[-3000:]
    resumed = launch.torchrun(prepared_data, run, **common)
    assert "resumed from" in resumed
    assert read_metrics(run)["train"][-1]["step"] == 60


def test_deepspeed_checkpoint_resumes_exactly(prepared_data, tmp_path):
    common = {
        **COMMON,
        "train.max_steps": 4,
        "parallel.engine": "deepspeed",
        "parallel.zero_stage": 2,
        "connection": "mhc",
    }
    full, split = tmp_path / "full", tmp_path / "split"
    launch.torchrun(prepared_data, full, **common)
    launch.torchrun(prepared_data, split, **common, **{"train.stop_at_step": 2})
    assert (split / "checkpoints" / "deepspeed" / "step_00000002").is_dir()
    # no second copy of the weights beside DeepSpeed's own shards: resume and export read those
    assert "model" not in CheckpointManager.load(split / "checkpoints" / "step_00000002.pt")
    out = launch.torchrun(prepared_data, split, **common)
    assert "resumed from" in out
    assert runs.losses(full) == runs.losses(split)
    want, got = runs.weights(full, 4), runs.weights(split, 4)  # assembled from DeepSpeed's partitions
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.fixture(scope="module")
def single_reference(reference_runs):
    """One-process reference runs of the pipeline tests' model, one per connection type (run once per session)."""
    return lambda arm: reference_runs(**PIPE_COMMON, connection=arm)


PIPE_COMMON = {**COMMON, "model.n_layer": 4, "train.batch_size": 8}


@pytest.mark.parametrize(
    "arm,schedule,recompute",
    [
        ("mhc", "1f1b", "none"),
        ("mhc", "1f1b", "mhc"),
        ("mhc", "zbv", "none"),
        ("mhc", "zbv", "mhc"),
        ("mhc", "zbv", "full"),
        ("mhc", "dualpipev", "none"),
        ("mhc", "dualpipev", "mhc"),
        ("mhc", "dualpipev", "full"),
        ("hc", "1f1b", "mhc"),
        ("hc", "zbv", "mhc"),
        ("hc", "dualpipev", "mhc"),
        ("residual", "1f1b", "none"),
        ("residual", "dualpipev", "full"),
        ("mhc", "interleaved1f1b", "mhc"),
        ("mhc", "csv", "mhc"),
    ],
)
def test_pipeline_matches_single_process(prepared_data, single_reference, tmp_path, arm, schedule, recompute):
    """PP=2 (stream state [B, T, n, C] crossing the boundary) equals one process: loss for loss, every gradient of
    step 1, weights after 3 steps. DualPipeV runs its OVERLAP_F_B pairs through our function (counted)."""
    ref, pp = single_reference(arm), tmp_path / "pp"
    overrides = {"parallel.pp": 2, "parallel.pp_schedule": schedule, "parallel.recompute": recompute}
    if arm == "hc":  # the paper's layout: each stage is one recompute block
        overrides["parallel.recompute_block"] = "stage"
    if schedule == "csv":  # a hand-written zero-bubble-style file: split backward (I then W), one stage per rank
        rank0 = [f"0F{i}" for i in range(4)] + [a for i in range(4) for a in (f"0I{i}", f"0W{i}")]
        rank1 = [a for i in range(4) for a in (f"1F{i}", f"1I{i}", f"1W{i}")]
        (tmp_path / "zb.csv").write_text(",".join(rank0) + "\n" + ",".join(rank1) + "\n")
        overrides["parallel.pp_schedule_csv"] = str(tmp_path / "zb.csv")
    out = launch.torchrun(prepared_data, pp, **PIPE_COMMON, connection=arm, **overrides)
    assert_close_runs(pp, ref, 3)
    if schedule == "dualpipev":  # 4 stages of 1 layer: one FFN site per overlapped forward
        m = re.search(r"OVERLAP_F_B: (\d+) overlapped F/B pairs, (\d+) FFN post_res", out)
        assert m and int(m.group(1)) > 0 and int(m.group(2)) == int(m.group(1)), out[-2000:]
        # rank 0 holds stages 0 and 3: a pair forwarding stage 0 sends to rank 1 from inside the pair
        sends = re.search(r"(\d+) boundary sends posted before the pair's backward", out)
        assert sends and 0 < int(sends.group(1)) <= int(m.group(1)), out[-2000:]
        # the issue order: each send right after the forward that produced it, on its stream, before the pair's B
        events = re.findall(r"(SEND_F|F|B)(\d+)\.(\d+)@(\d)", re.search(r"issue order: ([^\n]*)", out).group(1))
        sent = [i for i, e in enumerate(events) if e[0] == "SEND_F"]
        assert sent, events
        for i in sent:
            assert events[i - 1] == ("F", *events[i][1:]), events
            assert i + 1 == len(events) or events[i + 1][0] == "B", events


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_fsdp_matches_single_process(prepared_data, single_reference, tmp_path, arm):
    """FSDP2 data parallel (parameters, gradients and optimizer states sharded over 2 ranks) equals one process."""
    run = tmp_path / "fsdp"
    out = launch.torchrun(prepared_data, run, **PIPE_COMMON, connection=arm, **{"parallel.engine": "fsdp"})
    assert_close_runs(run, single_reference(arm), 3)
    held, total = (int(v.replace(",", "")) for v in re.search(r"holds ([\d,]+) of ([\d,]+) param", out).groups())
    assert held <= total // 2 + 64, out[-2000:]  # rank 0 holds about half: sharded, not replicated


@pytest.mark.parametrize(
    "arm,schedule,recompute,replicate",
    [
        ("mhc", "1f1b", "mhc", 1),
        ("mhc", "dualpipev", "mhc", 1),
        ("hc", "zbv", "none", 1),
        # HSDP per stage (dp_replicate=2, dp_shard=1): each shard sits on 2 ranks, the clip norm counts it once
        ("residual", "1f1b", "none", 2),
    ],
)
def test_pipeline_x_fsdp_matches_single_process(
    prepared_data, single_reference, tmp_path, arm, schedule, recompute, replicate
):
    """PP=2 x DP=2 on 4 processes (a (pp, dp) mesh; each stage sharded over its dp pair with FSDP2, or replicated
    over it as HSDP with dp_replicate=2) equals one process on the same global batch: loss for loss, every gradient,
    the pre-clip gradient norm, weights."""
    run = tmp_path / "pp_dp"
    overrides = {
        "parallel.pp": 2,
        "parallel.engine": "fsdp",
        "parallel.pp_schedule": schedule,
        "parallel.recompute": recompute,
        "parallel.dp_replicate": replicate,
    }
    if replicate > 1:  # weights by file checkpoint: full_model streams stage 1 from its first rank to rank 0
        overrides["checkpoint.format"] = "file"
    out = launch.torchrun(prepared_data, run, **PIPE_COMMON, connection=arm, **overrides, nproc=4)
    assert_close_runs(run, single_reference(arm), 3)
    norms = [[r["grad_norm"] for r in read_metrics(d)["train"]] for d in (run, single_reference(arm))]
    assert len(norms[0]) == len(norms[1]) and all(abs(a - b) <= 1e-5 * b for a, b in zip(*norms)), norms
    held, total = (int(v.replace(",", "")) for v in re.search(r"holds ([\d,]+) of ([\d,]+) param", out).groups())
    assert "pp=2 x dp=2 (FSDP2 per stage" in out, out[-2000:]
    # half the stages, sharded over the dp pair (or, under HSDP with dp_shard=1, whole on each replica)
    assert held < (total // 2 if replicate == 1 else 3 * total // 4), out[-2000:]


def test_pipeline_x_fsdp_checkpoint_resumes_exactly_and_into_fsdp_alone(prepared_data, tmp_path):
    """A PP=2 x DP=2 checkpoint (full state by parameter name, gathered from the FSDP shards) resumes on the same
    layout exactly, and into FSDP data parallel without a pipeline (re-sharded on load)."""
    common = {
        **PIPE_COMMON,
        "train.max_steps": 4,
        "connection": "mhc",
        "parallel.pp": 2,
        "parallel.engine": "fsdp",
        "parallel.pp_schedule": "dualpipev",
    }
    full, split = tmp_path / "full", tmp_path / "split"
    launch.torchrun(prepared_data, full, **common, nproc=4)
    launch.torchrun(prepared_data, split, **common, **{"train.stop_at_step": 2}, nproc=4)
    out = launch.torchrun(prepared_data, split, **common, nproc=4)
    assert "resumed from" in out
    assert runs.losses(full) == runs.losses(split)
    run = tmp_path / "fsdp"
    runs.copy_checkpoint(split, run, 2)
    out = launch.torchrun(prepared_data, run, **{**common, "parallel.pp": 1})
    assert "resumed from" in out
    tail_full, tail = runs.losses(full)[2:], runs.losses(run)
    assert len(tail) == 2 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(tail_full, tail)), (tail_full, tail)


@pytest.mark.parametrize("arm", ["residual", "mhc"])
def test_deepspeed_pipeline_engine_is_an_independent_oracle(prepared_data, tmp_path, arm):
    """DeepSpeed's PipelineModule (its own 1F1B runtime, p2p and accumulation) on the same model, data, optimizer
    and schedule reaches the same losses as our torch.distributed.pipelining run."""
    common = {**PIPE_COMMON, "connection": arm, "parallel.pp": 2, "parallel.pp_schedule": "1f1b"}
    ours, oracle = tmp_path / "ours", tmp_path / "oracle.json"
    launch.torchrun(prepared_data, ours, **common)
    overrides = run_overrides(prepared_data, tmp_path / "ds", **common)
    cmd = launch.torchrun_cmd([*overrides, "--out", str(oracle)])
    cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 2] = [str(launch.REPO / "scripts" / "deepspeed_pipeline_oracle.py")]
    launch.run(cmd, timeout=600)
    got = json.loads(oracle.read_text())
    theirs, mine = got["losses"], runs.losses(ours)
    assert len(theirs) == len(mine) == 3
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(theirs, mine)), (theirs, mine)
    # the gradient norm catches what Adam's scale invariance would hide from the losses (a wrong 1/M, say)
    norms = [r["grad_norm"] for r in read_metrics(ours)["train"]]
    assert all(abs(a - b) <= 1e-4 * b for a, b in zip(got["grad_norms"], norms)), (got["grad_norms"], norms)


def test_pipeline_checkpoint_resumes_exactly(prepared_data, tmp_path):
    common = {
        **COMMON,
        "train.max_steps": 4,
        "connection": "hc",
        "model.n_layer": 4,
        "parallel.pp": 2,
        "parallel.pp_schedule": "dualpipev",
    }
    full, split = tmp_path / "full", tmp_path / "split"
    launch.torchrun(prepared_data, full, **common)
    launch.torchrun(prepared_data, split, **common, **{"train.stop_at_step": 2})
    out = launch.torchrun(prepared_data, split, **common)
    assert "resumed from" in out
    assert runs.losses(full) == runs.losses(split)


def test_pipeline_checkpoint_resumes_in_one_process_and_under_ddp(prepared_data, tmp_path):
    """Checkpoints are layout-independent: parameter names and a by-name optimizer state."""
    common = {**COMMON, "train.max_steps": 4, "connection": "mhc", "model.n_layer": 4}
    pp = {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}
    full, split = tmp_path / "full", tmp_path / "pp"
    launch.single(run_overrides(prepared_data, full, **common))
    launch.torchrun(prepared_data, split, **common, **pp, **{"train.stop_at_step": 2})
    for target, cmd in (("single", launch.single), ("ddp", None)):
        run = tmp_path / target
        runs.copy_checkpoint(split, run, 2)
        overrides = run_overrides(prepared_data, run, **common)
        out = launch.single(overrides) if cmd else launch.run(launch.torchrun_cmd([*overrides, "parallel.engine=ddp"]))
        assert "resumed from" in out
        tail_full, tail = runs.losses(full)[2:], runs.losses(run)
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(tail_full, tail)), (target, tail_full, tail)
