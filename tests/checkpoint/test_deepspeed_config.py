"""The DeepSpeed config a run builds carries `parallel.zero`'s throughput settings (overlap, contiguous gradients,
bucket and ZeRO-3 prefetch sizes), per stage and device, without a process group or DeepSpeed itself."""

from __future__ import annotations

import pytest

from mhc_train.config import ConfigError, load_config
from mhc_train.parallel.data_parallel import deepspeed_config


def _config(preset: str, device: str = "cpu", *overrides: str) -> dict:
    cfg = load_config([f"parallel={preset}", *overrides])
    p, t = cfg.parallel, cfg.train
    return deepspeed_config(2, t.grad_accum, p.zero_stage, cfg.optim.grad_clip, p.zero, device)


def test_zero2_carries_overlap_contiguous_and_bucket_sizes():
    z = _config(
        "zero2", "cuda", "parallel.zero.reduce_bucket_size=200000000", "parallel.zero.allgather_bucket_size=300000000"
    )
    z = z["zero_optimization"]
    assert z == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
                 "allgather_bucket_size": 300_000_000}, z  # fmt: skip


def test_zero3_carries_its_prefetch_knobs_and_auto_overlap_is_deepspeed_s_default_on_cpu():
    z = _config("zero3", "cpu", "parallel.zero.stage3_prefetch_bucket_size=1000")["zero_optimization"]
    assert "overlap_comm" not in z and "allgather_bucket_size" not in z  # DeepSpeed decides (today's behaviour)
    assert z["stage"] == 3 and z["stage3_prefetch_bucket_size"] == 1000 and z["reduce_bucket_size"] == 500_000_000
    assert {"stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance"} <= set(z)
    off = _config("zero3", "cuda", "parallel.zero.overlap_comm=off")["zero_optimization"]
    assert off["overlap_comm"] is False


def test_a_bad_value_is_one_line():
    with pytest.raises(ConfigError, match="parallel.zero.overlap_comm"):
        load_config(["parallel=zero1", "parallel.zero.overlap_comm=sometimes"])
    with pytest.raises(ConfigError, match="parallel.zero.reduce_bucket_size"):
        load_config(["parallel=zero1", "parallel.zero.reduce_bucket_size=0"])
