"""Tensor + sequence parallelism (`parallel.tp`, parallel/tensor_parallel.py) on CPU gloo ranks.

- tp_checks.py under torchrun (2 ranks, one launch, each rank comparing against the one-process model it builds
  beside its TP copy): TP=2 equals one process loss for loss and gradient for gradient over 3 SGD steps (mHC, with
  and without recompute=mhc); no rank materialises [B, T, V] logits (a dispatch spy, checked to see them in one
  process) and the vocab-parallel loss equals the loss on the gathered logits; per-rank saved stream bytes are 1/tp
  of tp=1's. MHC_TRAIN_TP_FULL=1 adds the residual and HC arms, recompute=full, the Triton backend (interpreter) and
  a per-block compiled TP copy (train.compile, aot_eager) against eager.
- The trainer at TP2 x FSDP2 with recompute=mhc (4 ranks) equals one process: losses, val losses, every gradient of
  step 1, weights (the tp ranks of a dp group read the same batch: the engine slices data by the mesh's dp rank, not
  the global rank), every pre-clip grad norm and a diag step's site statistics (gathered over tp). PP2 x TP2 (4
  ranks, 1F1B) the same. MHC_TRAIN_TP_FULL=1 adds pure TP2 (engine=none, 2 ranks).
- Config-time refusals, one line each (no launch).
"""

from __future__ import annotations

import os

import pytest

from mhc_train.config import ConfigError, load_config
from mhc_train.config.validate import validate_world
from mhc_train.train.metrics import read_metrics
from tests.support import launch, runs
from tests.support.configs import DISTRIBUTED, run_overrides
from tests.support.numerics import assert_close_runs

FULL = "1" in (os.environ.get("MHC_TRAIN_TP_FULL"), os.environ.get("MHC_TRAIN_MATRIX_FULL"))  # make test-matrix
CASES = ["mhc:torch:none", "mhc:torch:mhc", "spy", "saved"]
FULL_CASES = ["residual:torch:none", "hc:torch:none", "hc:torch:full", "mhc:triton:none", "mhc:triton:mhc", "compile"]


@pytest.mark.slow
def test_tp2_matches_one_process_and_never_gathers_logits():
    cases = CASES + (FULL_CASES if FULL else [])
    cmd = launch.torchrun_cmd(cases, nproc=2, module="tests.parallel.tp_checks")
    out = launch.run(cmd, timeout=900, TRITON_INTERPRET="1")
    for case in cases:
        assert f"PASS {case}" in out, out[-3000:]


COMMON = {**DISTRIBUTED, "connection": "mhc"}  # test_distributed.py's settings: shared one-process references


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="MHC_TRAIN_TP_FULL=1: the 2-D test below covers the trainer under TP")
def test_trainer_tp2_matches_single_process(prepared_data, reference_runs, tmp_path):
    ref, run = reference_runs(**COMMON), tmp_path / "tp2"
    out = launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **{**COMMON, "parallel.tp": 2})))
    assert "tp: 2 ranks" in out, out[-2000:]
    assert_close_runs(run, ref, 3)


@pytest.mark.slow
def test_trainer_tp2_fsdp2_matches_single_process(prepared_data, reference_runs, tmp_path):
    """2-D: TP2 x FSDP2 at 4 ranks with recompute=mhc (the FSDP units follow the recompute blocks; gradients equal the
    plain model's, so the same reference as the TP2 test)."""
    common = {**COMMON, "train.diag_every": 3}  # a diag step: its site statistics cover every token, as in one process
    ref, run = reference_runs(**common), tmp_path / "tp2_fsdp2"
    overrides = {**common, "parallel.tp": 2, "parallel.engine": "fsdp", "parallel.recompute": "mhc"}
    out = launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **overrides), nproc=4), timeout=600)
    assert "tp x fsdp: tp=2" in out, out[-2000:]
    assert_close_runs(run, ref, 3)
    assert_close_diag(run, ref)


@pytest.mark.slow
def test_trainer_pp2_tp2_matches_single_process(prepared_data, reference_runs, tmp_path):
    """PP2 x TP2 at 4 ranks (each stage's [B, T/tp, n, C] slice crossing the boundary) equals one process, the diag
    step's statistics included (composed across the stages, gathered over tp)."""
    common = {**COMMON, "train.diag_every": 3}
    ref, run = reference_runs(**common), tmp_path / "pp2_tp2"
    overrides = {**common, "parallel.tp": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b"}
    out = launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **overrides), nproc=4), timeout=600)
    assert "pipeline: pp=2 x tp=2" in out, out[-2000:]
    assert_close_runs(run, ref, 3)
    assert_close_diag(run, ref)


def assert_close_diag(run, ref) -> None:
    """The diag records' site statistics (every site, every statistic) and every step's pre-clip grad norm equal the
    reference's to fp32 rounding."""
    norms = [[r["grad_norm"] for r in read_metrics(d)["train"]] for d in (run, ref)]
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(*norms)), norms
    (got,), (want,) = (read_metrics(d)["diag"] for d in (run, ref))
    assert got["sites"].keys() == want["sites"].keys() and got["sites"], (got["sites"].keys(), want["sites"].keys())
    for site, stats in want["sites"].items():
        for key, value in stats.items():
            mine = got["sites"][site][key]
            assert (mine is None) == (value is None), (site, key, mine, value)
            assert value is None or abs(mine - value) <= 1e-5 * max(1.0, abs(value)), (site, key, mine, value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"parallel.tp": 3}, "must divide model.n_head=4"),
        ({"parallel.tp": 2, "parallel.engine": "deepspeed"}, "DeepSpeed does not compose"),
        ({"parallel.cp": 2}, "context parallelism is not built"),
        ({"parallel.tp": 2, "parallel.pp": 2, "parallel.pp_schedule": "zbv"}, "with tp > 1 is not built"),
    ],
)
def test_tp_refusals_are_one_line(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(overrides=["model=test", "train=test", *(f"{k}={v}" for k, v in overrides.items())])
    assert "\n" not in str(err.value)


def test_world_must_split_into_tp():
    cfg = load_config(overrides=["model=test", "train=test", "parallel.tp=2"])
    validate_world(cfg, 2)  # pure tensor parallelism: dp = 1
    with pytest.raises(ConfigError, match="launch a multiple of pp x tp = 2"):
        validate_world(cfg, 3)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="MHC_TRAIN_TP_FULL=1: six 4-rank launches")
@pytest.mark.parametrize("first,second", [("tp2_fsdp2", "fsdp4"), ("fsdp4", "tp2_fsdp2")])
def test_dcp_checkpoint_resumes_across_a_change_of_tp(prepared_data, tmp_path, first, second):
    """A DCP checkpoint of TP2 x FSDP2 resumes at FSDP4 (re-sharded by parameter name on load), and the reverse, and
    the run continues with the losses of an uninterrupted run."""
    layouts = {"tp2_fsdp2": {"parallel.tp": 2}, "fsdp4": {"parallel.tp": 1}}
    common = {**COMMON, "train.max_steps": 4, "parallel.engine": "fsdp", "checkpoint.format": "dcp"}
    full, split, run = tmp_path / "full", tmp_path / "split", tmp_path / "resumed"

    def train(run_dir, layout, **extra):
        overrides = run_overrides(prepared_data, run_dir, **common, **layouts[layout], **extra)
        return launch.run(launch.torchrun_cmd(overrides, nproc=4), timeout=600)

    train(full, first)
    train(split, first, **{"train.stop_at_step": 2})
    runs.copy_checkpoint(split, run, 2)
    assert "resumed from" in train(run, second)
    tail_full, tail = runs.losses(full)[2:], runs.losses(run)
    assert len(tail) == 2 and all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(tail_full, tail)), (tail_full, tail)


def test_plan_covers_pp_tp_fsdp_with_stage_activations_split_over_tp():
    """`mhc-train plan` on the 3-D preset: the layout names pp x tp x dp, and a rank's activations and pipeline
    buffers (the [micro, T/tp, n, C] slices received) are below the same pipeline's at tp = 1 (same micro-batch)."""
    from mhc_train.plan import make_plan

    base = ["model=test", "train=gpu", "train.seq_len=64", "parallel=pp_tp_fsdp", "train.grad_accum=1"]
    tp = make_plan(load_config([*base, "train.batch_size=8"]), 8)
    one = make_plan(load_config([*base, "train.batch_size=16", "parallel.tp=1"]), 8)
    assert "pp=2 x tp=2 x dp=2" in tp["engine"], tp["engine"]
    assert tp["bytes"]["activations"] < 0.6 * one["bytes"]["activations"], (tp["bytes"], one["bytes"])
    # the buffers hold the received [micro, T/tp, n, C] slices (halved) beside the gather buffers (not halved): the
    # last stage returns its chunked loss, so no vocab-sharded logits are kept across micro-batches any more
    assert tp["bytes"]["buffers"] < 0.8 * one["bytes"]["buffers"], (tp["bytes"], one["bytes"])
