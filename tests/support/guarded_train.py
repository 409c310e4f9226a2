"""`python -m tests.support.guarded_train [overrides]`: `python -m mhc_train.train` in which gathering the whole model
fails the run (`Engine.full_model`, `engine.materialise_on_host` and `engine.host_state` raise), for tests that prove a training run never
gathers it (under torchrun: `launch.torchrun_cmd(overrides, module="tests.support.guarded_train")`)."""

from __future__ import annotations

import runpy

from mhc_train.parallel import data_parallel, engine, fsdp, pipeline


def _refuse(*args, **kwargs):
    raise AssertionError("the whole model was gathered during training (full_model / materialise_on_host)")


engine.Engine.full_model = _refuse
for module in (engine, data_parallel):
    module.materialise_on_host = _refuse
for module in (engine, fsdp, pipeline):
    module.host_state = _refuse

runpy.run_module("mhc_train.train", run_name="__main__", alter_sys=True)
