from mhc_train.model.connections import Connection, build_connection
from mhc_train.model.transformer import BlockRunner, SitePart, Transformer, build_model, lm_loss, no_weight_decay

__all__ = [
    "BlockRunner",
    "Connection",
    "SitePart",
    "Transformer",
    "build_connection",
    "build_model",
    "lm_loss",
    "no_weight_decay",
]
