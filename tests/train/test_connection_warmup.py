"""optim.connection_warmup_steps: the connection groups' LR ramps from 0 on top of the schedule (an upcycled
connection's warm-up), against a hand computation through the real optimizer and scheduler; 0 keeps one group pair
and one schedule function; a run stopped mid-ramp and resumed trains loss for loss and bit for bit as one that was
not."""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import OptimConfig, ScheduleConfig, load_config
from mhc_train.optim import build_optimizer, build_scheduler
from mhc_train.train.trainer import Trainer
from tests.support import runs
from tests.support.configs import conn_cfg, run_overrides, tiny_model_cfg


def _lrs(warmup: int, steps: int = 6) -> list[dict[str, float]]:
    from mhc_train.model.transformer import build_model

    model = build_model(tiny_model_cfg(), conn_cfg("mhc"), seed=0)
    opt = build_optimizer(model, OptimConfig(lr=0.01, connection_warmup_steps=warmup))
    sched = build_scheduler(opt, 10, ScheduleConfig(name="constant", warmup_steps=2), connection_warmup_steps=warmup)
    out = []
    for _ in range(steps):
        out.append({g["name"]: g["lr"] for g in opt.param_groups})
        model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return out


def test_connection_lr_ramps_on_top_of_the_schedule():
    main = [0.005, 0.01, 0.01, 0.01, 0.01, 0.01]  # warm-up 2 then constant, peak 0.01
    ramp = [1 / 4, 2 / 4, 3 / 4, 1, 1, 1]  # (step + 1) / 4, then 1
    for step, lrs in enumerate(_lrs(warmup=4)):
        assert lrs["decay"] == lrs["no_decay"] == pytest.approx(main[step], rel=1e-12)
        want = main[step] * ramp[step]
        assert lrs["conn_decay"] == lrs["conn_no_decay"] == pytest.approx(want, rel=1e-12), (step, lrs)
    off = _lrs(warmup=0, steps=2)  # the default: no connection groups, the one schedule as before
    assert [list(lrs) for lrs in off] == [["decay", "no_decay"]] * 2 and off[0]["decay"] == 0.005


def test_resume_mid_ramp_is_exact(prepared_data, tmp_path):
    common = {"train.max_steps": 6, "checkpoint.every": 0, "connection": "mhc", "optim.connection_warmup_steps": 5,
              "train.eval_every": 1000, "train.diag_every": 0}  # fmt: skip
    Trainer(load_config(run_overrides(prepared_data, tmp_path / "full", **common))).run()
    split = tmp_path / "split"
    Trainer(load_config(run_overrides(prepared_data, split, **common, **{"train.stop_at_step": 3}))).run()
    Trainer(load_config(run_overrides(prepared_data, split, **common))).run()
    full, resumed = runs.losses_by_step(tmp_path / "full"), runs.losses_by_step(split)
    assert full.keys() == resumed.keys() == set(range(1, 7))
    assert all(full[s] == resumed[s] for s in full), (full, resumed)
    a = torch.load(tmp_path / "full/checkpoints/step_00000006.pt", weights_only=False)["model"]
    b = torch.load(split / "checkpoints/step_00000006.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
