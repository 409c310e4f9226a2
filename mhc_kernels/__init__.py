"""Fused Triton kernels for the mHC/HC connection math, reached only through `mhc_train.ops` (backend triton | auto).
Not named `kernels`: that is a PyPI package transformers imports, and a top-level folder of that name shadowed it
whenever the repository root was on sys.path.

- `projection.py`  kernel 1: v @ phi and sum(v^2) in one pass, reordered RMSNorm; fused dv + dphi backward
- `gates.py`       kernel 2: gates, biases, sigmoid, 2*sigmoid and all Sinkhorn iterations in one kernel
- `hc_gates.py`    HC's dynamic coefficients (tanh, scales, static part) after the per-stream projection
- `sinkhorn.py`    the Sinkhorn iterations alone (ops.sinkhorn_knopp); backward recomputes the iterates on chip
- `stream_mix.py`  kernels 3 and 4: mhc_pre (reads nC, writes C) and mhc_post_res (reads (n+1)C, writes nC)
- `link.py`        `SiteLink`: a site's ops hand their x-gradient terms to the projection, which writes one dx
Each file opens with its formula and backward derivation; its PyTorch reference is in `mhc_train/ops/`.
On CPU they run only through Triton's interpreter: set TRITON_INTERPRET=1 before anything imports triton.
"""

from .gates import mhc_gates_sinkhorn
from .hc_gates import hc_gates
from .link import SiteLink
from .projection import mhc_projection
from .sinkhorn import sinkhorn_knopp
from .stream_mix import mhc_post_res, mhc_pre
from .utils import MAX_STREAMS

__all__ = [
    "MAX_STREAMS",
    "SiteLink",
    "hc_gates",
    "mhc_gates_sinkhorn",
    "mhc_post_res",
    "mhc_pre",
    "mhc_projection",
    "sinkhorn_knopp",
]
