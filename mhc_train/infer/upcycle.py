"""A function-preserving start for every arm: the connection sites set so that an n-stream model computes what the
one-stream (residual) model it was imported from computes, with the streams' symmetry broken.

Axis legend: n streams, C channels; site k is the k-th connection site in forward order (2 per block).

The streams start as n copies of the token embedding h_0 (`Connection.expand`) and are summed before the final
RMSNorm (`Connection.collapse`); neither is a parameter. What the sites can do:
- HC (`HCSite`, unconstrained A_m, B, A_r): exact. Site 0 reads the mean of the copies (A_m = 1/n) and scales them by
  A_r = I/n, so the streams sum to h_0; every later site reads their sum (A_m = 1) and keeps them (A_r = I). Every
  site writes its output with weights B summing to 1, so the streams' sum is the residual stream h_l at every
  depth and the collapse gives exactly h_L. The dynamic parts start at W = 0 (tanh 0 = 0).
- mHC (`MHCSite`, H_pre in (0, 1), H_post in (0, 2), H_res doubly stochastic or I): H_pre = 1/n reads the streams'
  mean, H_post sums to n and H_res preserves the sum (its columns sum to 1), so the mean is the residual stream at
  every depth; phi = 0 removes the input-dependent part. The collapse sums n streams, n h_L, and the final
  RMSNorm is scale-invariant up to its eps: the start equals the residual model up to eps (1 - 1/n^2) / (2 ms),
  about 1e-7 relative at eps 1e-6 (measured per arm in tests/infer/test_import_hf.py).
- Symmetry: site k writes more to stream k mod n (`skew`, s): its write weight is (1 + s) and the others'
  (1 - s / (n - 1)), over n for HC, as H_post for mHC. The streams then differ from the first site on, so their
  gradients differ (with s = 0 they would stay identical copies forever). s in [0, 1); the default 0.5.
"""

from __future__ import annotations

import math

import torch

from mhc_train.infer.errors import InferenceError
from mhc_train.model.connections import HCSite, MHCSite
from mhc_train.model.transformer import Transformer

DEFAULT_SKEW = 0.5


def write_weights(n: int, k: int, skew: float) -> torch.Tensor:
    """[n]: (1 + s) on stream k mod n, (1 - s / (n - 1)) elsewhere; they sum to n."""
    w = torch.full((n,), 1.0 - skew / (n - 1), dtype=torch.float64)
    w[k % n] = 1.0 + skew
    return w


@torch.no_grad()
def upcycle(model: Transformer, skew: float = DEFAULT_SKEW) -> None:
    """Set every connection site of `model` (weights already imported) for the function-preserving start above."""
    n = model.n_streams
    if n == 1:
        return  # the residual arm: nothing to set
    if not 0.0 <= skew < 1.0:
        raise InferenceError(f"--upcycle-skew must be in [0, 1), got {skew}")
    for k, (_, site) in enumerate(model.sites()):
        w = write_weights(n, k, skew)
        if isinstance(site, HCSite):
            first = k == 0
            site.static_alpha_m.fill_(1.0 / n if first else 1.0)
            site.static_beta.copy_(w / n)
            site.static_alpha_r.copy_(torch.eye(n) / (n if first else 1))
            if site.dynamic:
                site.dyn_proj.zero_()
        elif isinstance(site, MHCSite):
            site.phi.zero_()
            site.bias[:n] = -math.log(n - 1)  # sigmoid(-log(n - 1)) = 1 / n
            site.bias[n : 2 * n] = torch.logit(w / 2)  # 2 sigmoid(b) = w
        else:
            raise InferenceError(f"no function-preserving start for {type(site).__name__}; import with residual")
