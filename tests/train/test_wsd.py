"""schedule=wsd: the LR of every step against a hand computation, and cooldowns started from a constant-stage
checkpoint through the trainer (the same checkpoint serving two different cooldowns)."""

from __future__ import annotations

import math

import pytest

from mhc_train.config import ConfigError, ScheduleConfig, load_config
from mhc_train.optim import lr_multiplier
from mhc_train.train.metrics import read_metrics
from mhc_train.train.trainer import Trainer
from tests.support.configs import run_overrides

QUIET = {"train.eval_every": 1000, "train.diag_every": 0, "checkpoint.every": 0, "optim.lr": 0.01}
WSD = {"schedule": "wsd", "schedule.warmup_steps": 2, "schedule.min_lr_ratio": 0.1}


def test_wsd_multiplier_matches_hand_computation():
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.4, decay_shape="linear")
    # total 10: warm-up 0.5, 1; constant to step 5; decay over steps 6..9 (the last 40%), p = 1/4 .. 4/4
    expected = [0.5, 1, 1, 1, 1, 1, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.25, 0.1]
    assert [lr_multiplier(s, 10, cfg) for s in range(10)] == pytest.approx(expected, abs=1e-12)
    cfg.decay_shape = "1-sqrt"
    expected[6:] = [0.1 + 0.9 * (1 - math.sqrt(k / 4)) for k in (1, 2, 3, 4)]
    assert [lr_multiplier(s, 10, cfg) for s in range(10)] == pytest.approx(expected, abs=1e-12)
    cfg.decay_start = 3  # an explicit start overrides the fraction: decay over steps 3..9, p = 1/7 .. 7/7
    assert lr_multiplier(2, 10, cfg) == 1.0
    assert lr_multiplier(3, 10, cfg) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 7)), abs=1e-12)
    assert lr_multiplier(9, 10, cfg) == pytest.approx(0.1, abs=1e-12)


def test_wsd_config_errors_name_the_key(prepared_data, tmp_path):
    for bad, key in (({"schedule.decay_shape": "cosine"}, "decay_shape"), ({"schedule.decay_start": 9}, "decay_start")):
        with pytest.raises(ConfigError, match=f"schedule.{key}"):
            load_config(run_overrides(prepared_data, tmp_path / "r", **WSD, **bad))


def _lrs(run) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run)["train"]}


def test_cooldowns_from_one_constant_stage_checkpoint(prepared_data, tmp_path):
    """A run in its constant stage stops at step 4; two cooldowns resume that one checkpoint with different
    decay_start / max_steps / shape, each with the LR per step of the hand computation."""
    stable = tmp_path / "stable"
    Trainer(load_config(run_overrides(prepared_data, stable, **QUIET, **WSD, **{"train.max_steps": 40,
                                                                                 "train.stop_at_step": 4}))).run()  # fmt: skip
    ckpt = stable / "checkpoints" / "step_00000004.pt"
    assert ckpt.is_file()
    assert [_lrs(stable)[s] for s in (1, 2, 3, 4)] == pytest.approx([0.005, 0.01, 0.01, 0.01], abs=1e-12)
    before = ckpt.read_bytes()
    for shape, end, name in (("linear", 8, "cool_a"), ("1-sqrt", 6, "cool_b")):
        run = tmp_path / name
        over = {"train.max_steps": end, "schedule.decay_start": 4, "schedule.decay_shape": shape,
                "checkpoint.resume": str(ckpt)}  # fmt: skip
        Trainer(load_config(run_overrides(prepared_data, run, **QUIET, **WSD, **over))).run()
        lrs, n = _lrs(run), end - 4
        for step in range(5, end + 1):  # the LR that trained step `step` (0-based optimiser step step - 1)
            p = (step - 4) / n
            left = 1 - p if shape == "linear" else 1 - math.sqrt(p)
            assert lrs[step] == pytest.approx(0.01 * (0.1 + 0.9 * left), rel=1e-9), (name, step, lrs)
        assert lrs[end] == pytest.approx(0.001, rel=1e-9)
    assert ckpt.read_bytes() == before  # the checkpoint stays as it was, reusable for further cooldowns
