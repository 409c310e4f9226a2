from mhc_train.model.connections import Connection, build_connection
from mhc_train.model.transformer import Transformer, build_model, no_weight_decay

__all__ = ["Connection", "Transformer", "build_connection", "build_model", "no_weight_decay"]
