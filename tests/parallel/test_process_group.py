"""The process group's settings (no process group is started: `init_process_group` is replaced): `parallel.timeout_s`
reaches it as its collective timeout, and a timeout under one second is refused at load."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mhc_train.config import ConfigError, load_config
from mhc_train.parallel import dist


def test_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kw: seen.update(kw))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    info = dist.init_distributed("cpu", timeout_s=42)
    assert (info.rank, info.world) == (1, 2)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=42)}


def test_timeout_default_and_refusal():
    assert load_config(["model=test", "train=test"]).parallel.timeout_s == 1800
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        load_config(["model=test", "train=test", "parallel.timeout_s=0"])
