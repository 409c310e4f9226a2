"""A DeepSpeed ZeRO-2 checkpoint written by 2 gloo ranks resumes at 1 rank through DeepSpeed's universal checkpoint
(checkpoint/universal.py): converted once next to the checkpoint, and the continued run's losses are those of an
uninterrupted run (one process: what 2-rank ZeRO-2 is tested to match, tests/parallel/test_distributed.py); a conversion that
fails stops the resume with one line naming the fix."""

import pytest

from tests.support import launch, runs
from tests.support.configs import run_overrides

COMMON = {"train.max_steps": 4, "train.batch_size": 4, "checkpoint.every": 0, "train.threads": 1, "connection": "mhc"}
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
    got, want = runs.losses(run), runs.losses(ref)
    assert len(got) == len(want) == 4 and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(got, want)), (got, want)
