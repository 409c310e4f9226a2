"""Widths a model config implies but does not spell out, defined once for everyone who needs them: the model builds
its layers from them (model/transformer.py) and the config rules check them (validate_tp.py), and config cannot
import model (the layering: config is rank 1, model rank 3)."""

from __future__ import annotations

from mhc_train.config.schema import ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """The SwiGLU hidden width: model.ffn_hidden_dim, or LLaMA's 2/3 * 4 * dim rounded up to model.multiple_of."""
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(2 * 4 * cfg.dim / 3)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
