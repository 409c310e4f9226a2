"""Engine x precision x recompute x backend: every combination the config accepts runs, here in a pairwise cover
(each engine with bf16 and fp32, each recompute mode; the Triton backend under a split-backward pipeline, the
one place it differs: under the interpreter a 2-rank Triton run costs minutes, and the kernels' own tests cover
them against the reference), two steps on 2 (or 4) gloo
ranks, against one process at the same precision and backend; the one combination the config refuses says why.

What it guards (each failed before): DeepSpeed's own bf16 mode cast phi to bf16 (the Triton projection refused it),
a pipeline never entered autocast (its bf16 loss was the fp32 one bit for bit), and ZeRO-3 with recompute=mhc failed
on the first backward.

`make test` runs one representative case per row (the first of each engine family and backend); the rest of the
matrix is marked `matrix_full` and runs under `make test-matrix` (MHC_TRAIN_MATRIX_FULL=1), which runs all of it.
The one-process references come from the session's shared `reference_runs`.
"""

from __future__ import annotations

import pytest

from mhc_train.config import ConfigError, load_config
from tests.support import launch, runs
from tests.support.configs import run_overrides
from tests.support.numerics import assert_close_runs

BASE = {
    "train.max_steps": 2,
    "train.batch_size": 8,
    "model.n_layer": 4,
    "checkpoint.every": 0,
    "train.threads": 1,
    "train.eval_every": 1000,
    "train.diag_every": 0,
    # At the default init (std 0.02) the logits are ~0.1 and the step-1 loss sits at ln(vocab) whatever the
    # precision: bf16 and fp32 differed by 2e-6, two fp32 ulps, no larger than a batch split's reordering. At 0.2
    # they differ by ~2e-3, so "closer to bf16 than to fp32" below can tell the two apart.
    "model.init_std": 0.2,
}
DS = {"parallel.engine": "deepspeed"}
# The interpreter runs the Sinkhorn backward's iterations one by one in Python: 4 instead of 20 cuts the Triton case
# from minutes to seconds and still walks every (column, row) step of the exact backward. Its cost is per program
# instance, i.e. per token tile: a quarter of the tokens (4 sequences of 16, one per micro-batch) cut the pipeline's
# Triton representative from ~200 s to a fraction, every kernel and the split backward still run.
SHORT = {"torch": {}, "triton": {"connection.t_max": 4, "train.batch_size": 4, "train.seq_len": 16}}
PP = {"parallel.pp": 2}
# bf16s: bf16 compute and bf16 stream storage (model.stream_dtype, the paper's setting)
PRECISION = {
    "fp32": {"train.precision": "fp32"},
    "bf16": {"train.precision": "bf16"},
    "bf16s": {"train.precision": "bf16", "model.stream_dtype": "bf16"},
}

# (engine overrides, precision, recompute, backend, arm, processes)
MATRIX = [
    ({"parallel.engine": "ddp"}, "bf16", "mhc", "torch", "mhc", 2),
    ({"parallel.engine": "ddp"}, "fp32", "full", "torch", "mhc", 2),
    ({"parallel.engine": "fsdp"}, "bf16s", "none", "torch", "hc", 2),
    ({"parallel.engine": "fsdp"}, "fp32", "mhc", "torch", "mhc", 2),
    ({**DS, "parallel.zero_stage": 1}, "bf16", "mhc", "torch", "mhc", 2),
    ({**DS, "parallel.zero_stage": 2}, "bf16s", "none", "torch", "mhc", 2),
    ({**DS, "parallel.zero_stage": 3}, "bf16", "none", "torch", "mhc", 2),
    ({**DS, "parallel.zero_stage": 3}, "fp32", "none", "torch", "hc", 2),
    ({**PP, "parallel.pp_schedule": "1f1b"}, "bf16s", "mhc", "torch", "mhc", 2),
    ({**PP, "parallel.pp_schedule": "dualpipev"}, "bf16", "full", "torch", "hc", 2),
    ({**PP, "parallel.pp_schedule": "zbv"}, "fp32", "mhc", "triton", "mhc", 2),
    # the linked site (one dx, mhc_kernels/link.py) under a split backward and DualPipeV's overlapped F/B
    ({**PP, "parallel.pp_schedule": "dualpipev"}, "fp32", "none", "triton", "mhc", 2),
    ({**PP, "parallel.engine": "fsdp", "parallel.pp_schedule": "1f1b"}, "bf16", "none", "torch", "mhc", 4),
    # a split backward x FSDP in bf16: per-block units (bf16 gathers, fp32 sites), kept gathered until the W step
    ({**PP, "parallel.engine": "fsdp", "parallel.pp_schedule": "dualpipev"}, "bf16", "mhc", "torch", "mhc", 4),
]


def _id(case):
    engine, precision, recompute, backend, arm, nproc = case
    name = "pp_" + engine.get("parallel.pp_schedule", "") if "parallel.pp" in engine else engine["parallel.engine"]
    name += f"{engine.get('parallel.zero_stage', '')}" + (
        "_fsdp" if "parallel.pp" in engine and "parallel.engine" in engine else ""
    )
    return f"{name}-{precision}-{recompute}-{backend}-{arm}-x{nproc}"


@pytest.fixture(scope="module")
def reference(reference_runs):
    """One process, recompute none (recompute changes no bit), per (precision, backend, arm); run once per session."""

    def get(precision, backend, arm):
        extra = {**PRECISION[precision], "connection.backend": backend, "connection": arm, **SHORT[backend]}
        return reference_runs(**{**BASE, **extra})

    return get


def _row(case):
    """A case's row: its engine family (ddp, fsdp, deepspeed, pipeline, pipeline x fsdp) and its backend."""
    engine, backend = case[0], case[3]
    family = (
        ("pp_fsdp" if "parallel.engine" in engine else "pp") if "parallel.pp" in engine else engine["parallel.engine"]
    )
    return family, backend


def _cases():
    """`make test` runs the first case of each row; the others are `matrix_full` (`make test-matrix` runs all)."""
    rows = set()
    for case in MATRIX:
        marks = () if _row(case) not in rows else (pytest.mark.matrix_full,)
        rows.add(_row(case))
        yield pytest.param(case, id=_id(case), marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_cases()))
def test_every_accepted_combination_trains_like_one_process(prepared_data, reference, tmp_path, case):
    engine, precision, recompute, backend, arm, nproc = case
    run = tmp_path / "run"
    extra = {**PRECISION[precision], "connection.backend": backend, "parallel.recompute": recompute}
    if "parallel.pp" in engine:
        extra["parallel.recompute_block"] = "stage"
    overrides = run_overrides(prepared_data, run, **{**BASE, **engine, **extra, **SHORT[backend]}, connection=arm)
    launch.run(launch.torchrun_cmd(overrides, nproc=nproc), timeout=600)
    got, ref = runs.losses(run), runs.losses(reference(precision, backend, arm))
    tol = 1e-5 if precision == "fp32" else 2e-2  # bf16: another split of the batch rounds differently
    assert len(got) == len(ref) == 2 and all(abs(a - b) <= tol * abs(b) for a, b in zip(got, ref)), (got, ref)
    # FSDP with one unit per block gathers the weights in bf16 (fsdp.py note 3): the embedding and the norms are then
    # rounded too, which autocast leaves in fp32, so its numbers need not sit nearer one process's bf16 than its fp32
    # (with or without recompute, fsdp.py note 1); a bf16 pipeline's stages are such units at dp = 1 and under every
    # schedule but csv too (build.stage_fsdp)
    bf16_gathers = engine.get("parallel.engine") == "fsdp" or "parallel.pp" in engine
    if precision != "fp32":  # it really ran in bf16: not the fp32 numbers, and closer to bf16's than to fp32's
        fp32 = runs.losses(reference("fp32", backend, arm))
        assert got[0] != fp32[0], (got, fp32)
        assert bf16_gathers or abs(got[0] - ref[0]) < abs(got[0] - fp32[0]), (got, ref, fp32)
    if precision == "bf16s":  # and its streams were stored in bf16: not the fp32-stream bf16 numbers
        assert got[0] != runs.losses(reference("bf16", backend, arm))[0], got
    weights = runs.weights(run, 2)
    assert all(w.dtype == weights["tok_embeddings.weight"].dtype == torch_float32() for w in weights.values()), {
        k: w.dtype for k, w in weights.items() if w.dtype != torch_float32()
    }  # fp32 master weights whatever the engine (phi, gates and biases included)


def torch_float32():
    import torch

    return torch.float32


@pytest.mark.parametrize("mode", ["mhc", "full"])
def test_zero3_with_recompute_is_refused_with_the_way_out(mode):
    zero3 = ["model=test", "train=test", "parallel.engine=deepspeed", "parallel.zero_stage=3"]
    with pytest.raises(ConfigError, match=rf"parallel.recompute='{mode}' is invalid: ZeRO-3 .*parallel.engine=fsdp"):
        load_config([*zero3, f"parallel.recompute={mode}"])
    load_config([*zero3, "parallel.recompute=none"])
    load_config(["model=test", "train=test", "parallel.engine=fsdp", f"parallel.recompute={mode}"])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_gradient_accumulation_reduces_once_and_equals_one_process(prepared_data, reference_runs, tmp_path, engine):
    """grad_accum=2: the micro-batches before the last skip the reduction (DDP no_sync, FSDP2
    set_requires_gradient_sync(False)); the step's gradient still equals one process's on every parameter."""
    common = {**BASE, "train.grad_accum": 2, "train.dump_grads_at": 1, "connection": "mhc"}
    ref, dp = reference_runs(**common), tmp_path / engine  # one reference for both engines
    launch.run(
        launch.torchrun_cmd(run_overrides(prepared_data, dp, **common, **{"parallel.engine": engine})), timeout=600
    )
    assert_close_runs(dp, ref, 2)


def test_sharded_engines_build_from_the_meta_device():
    """DeepSpeed and FSDP engines get a skeleton (they allocate only what each rank trains: test_setup_memory.py
    measures it); one process and DDP take a built model."""
    from mhc_train.parallel import builds_on_meta

    for stage in (1, 2, 3):
        assert builds_on_meta(
            load_config(["model=test", "train=test", "parallel.engine=deepspeed", f"parallel.zero_stage={stage}"])
        )
    assert builds_on_meta(load_config(["model=test", "train=test", "parallel.engine=fsdp"]))
    for engine in ("none", "ddp"):
        assert not builds_on_meta(load_config(["model=test", "train=test", f"parallel.engine={engine}"]))
