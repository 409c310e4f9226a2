"""The model: a plain decoder-only transformer whose residual stream is a `Connection` (residual, HC or mHC behind
one interface). It knows nothing of parallelism; `mhc_train.parallel` wraps it from outside.

- `transformer.py`: `Transformer`, `build_model` (validates the configs, builds, initialises), `lm_loss`,
  `chunked_lm_loss`;
- `connections.py`: the connections and their sites (parameters and coefficient math; `mhc_train.ops` runs the site);
- `layers.py`: RMSNorm, attention, FFN, RoPE.
- `single_pass.py`: DeepSeek-V4.1's single-pass mHC (registers `mhc_single_pass` with `build_connection`);
  `deepseek_map.py`: our mHC parameters to and from DeepSeek-V4's names and layouts.
"""

from mhc_train.model import single_pass  # noqa: F401  (registers connection.type=mhc_single_pass)
from mhc_train.model.connections import Connection, build_connection
from mhc_train.model.transformer import (
    BlockRunner,
    SitePart,
    Transformer,
    build_model,
    chunked_lm_loss,
    lm_loss,
    no_weight_decay,
)

__all__ = [
    "BlockRunner",
    "Connection",
    "SitePart",
    "Transformer",
    "build_connection",
    "build_model",
    "chunked_lm_loss",
    "lm_loss",
    "no_weight_decay",
]
