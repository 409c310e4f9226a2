"""A DeepSpeed ZeRO-2 checkpoint written by 2 gloo ranks resumes at 1 rank through DeepSpeed's universal checkpoint
(checkpoint/universal.py): converted once and kept next to the checkpoint; the continued run's losses, gradients and
weights equal an uninterrupted run's (one process: what 2-rank ZeRO-2 is tested to match in
tests/parallel/test_distributed.py). A conversion that fails stops the resume with one line naming the fix."""

import pytest

from mhc_train.checkpoint.universal import convert
from tests.support import launch
from tests.support.configs import run_overrides
from tests.support.numerics import assert_close_runs

# tests/parallel/test_distributed.py's settings: its one-process reference of them is trained once per session
COMMON = {"train.max_steps": 3, "train.batch_size": 4, "checkpoint.every": 0, "train.threads": 1,
          "train.dump_grads_at": 1, "connection": "mhc"}  # fmt: skip
DS = {"parallel.engine": "deepspeed", "parallel.zero_stage": 2}


def test_a_failed_conversion_is_one_line_naming_the_fix(tmp_path):
    from types import SimpleNamespace

    from mhc_train.checkpoint import CheckpointError
    from mhc_train.checkpoint.formats import FORMATS
    from mhc_train.parallel import DistInfo

    engine = SimpleNamespace(dist=DistInfo(rank=0, world=1))
    path = tmp_path / "checkpoints/step_00000002.pt"
    state = {"world_size": 2, "deepspeed_tag": "step_00000002"}  # its DeepSpeed shards are missing
    with pytest.raises(CheckpointError, match="universal form .* relaunch with the world size that wrote it") as e:
        FORMATS["deepspeed"].load(engine, state, path)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # torchrun at 2 ranks, then at 1
def test_deepspeed_zero2_resumes_at_another_world_size(prepared_data, reference_runs, tmp_path):
    ref, run = reference_runs(**COMMON), tmp_path / "resharded"
    launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **COMMON, **DS, **{"train.stop_at_step": 2})),
               timeout=600)  # fmt: skip
    out = launch.run(launch.torchrun_cmd(run_overrides(prepared_data, run, **COMMON, **DS), nproc=1), timeout=600)
    assert "resumed from" in out and "at 1 ranks through its universal form" in out, out[-3000:]
    sharded = run / "checkpoints" / "deepspeed" / "step_00000002"
    assert (sharded / "universal" / "zero" / "optimizer_state.pt").is_file()  # kept for the next resume
    assert not (sharded / "universal.partial").exists()
    stamp = (sharded / "universal").stat().st_mtime_ns
    assert convert(sharded) == sharded / "universal" and (sharded / "universal").stat().st_mtime_ns == stamp  # reused
    # losses, step 1's gradients (2 ranks), and the weights after step 3 (1 rank: Adam's moments and the schedule's
    # position came through the conversion) equal one process's, as 2-rank ZeRO-2 does uninterrupted
    assert_close_runs(run, ref, 3)
