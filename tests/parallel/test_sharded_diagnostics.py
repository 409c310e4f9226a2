"""Diagnostics on sharded and cut models (issue 24, item 1): a diag step under FSDP, DeepSpeed ZeRO-3 and the pipeline
(alone and x FSDP) computes the same statistics as one process, on every rank's own shards or stages, and no rank
gathers the whole model (the run goes through `tests.support.guarded_train`, where that fails it)."""

from __future__ import annotations

import math

import pytest

from mhc_train.train.metrics import read_metrics
from tests.support import launch

pytestmark = pytest.mark.slow  # every test launches torchrun (2 or 4 gloo ranks)

DIAG = {
    "model.n_layer": 4,
    "train.batch_size": 8,
    "train.max_steps": 2,
    "train.diag_every": 1,
    "checkpoint.every": 0,
    "checkpoint.save_final": "false",
    "train.threads": 1,
    "connection": "mhc",
}


def diag_records(run_dir) -> list[dict]:
    recs = read_metrics(run_dir).get("diag", [])
    assert [r["step"] for r in recs] == [1, 2], recs
    return recs


def assert_close_stats(actual, expected, where: str = "") -> None:
    """Every statistic of a diag record (nested per site) equal to tolerance; None where the reference has None."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for k in expected:
            assert_close_stats(actual[k], expected[k], f"{where}.{k}")
    elif expected is None:
        assert actual is None, where
    else:  # weights after the same Adam steps agree to float order (see numerics.assert_close_runs): lr-sized at most
        assert math.isclose(actual, expected, rel_tol=1e-4, abs_tol=1e-5), f"{where}: {actual} vs {expected}"


def check(run_dir, reference) -> None:
    for got, ref in zip(diag_records(run_dir), diag_records(reference)):
        stats = {k: v for k, v in ref.items() if k not in ("grad_norms", "kind", "segment")}
        assert_close_stats({k: got[k] for k in stats}, stats, f"step {ref['step']}")


@pytest.mark.parametrize(
    "name,overrides,nproc",
    [
        ("fsdp", {"parallel.engine": "fsdp"}, 2),
        ("zero3", {"parallel.engine": "deepspeed", "parallel.zero_stage": 3}, 2),
        ("pp_x_fsdp", {"parallel.engine": "fsdp", "parallel.pp": 2, "parallel.recompute": "mhc"}, 4),
        ("pp_dualpipev", {"parallel.pp": 2, "parallel.pp_schedule": "dualpipev"}, 2),
    ],
)
def test_diag_step_on_sharded_model_equals_one_process(prepared_data, reference_runs, tmp_path, name, overrides, nproc):
    """The `diag` records of steps 1 and 2 equal one process's; the guarded run fails if anything gathers the model
    (today's trainer called `engine.full_model()` on every diag step). DualPipeV puts stages 0 and 3 on rank 0: the
    composites cross the boundary both ways within one rank's stages."""
    ref, run = reference_runs(**DIAG), tmp_path / name
    launch.torchrun(prepared_data, run, nproc=nproc, module="tests.support.guarded_train", **DIAG, **overrides)
    check(run, ref)
