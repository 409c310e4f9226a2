"""A memory model of the bytes autograd keeps for backward, per token, under each recompute mode.

Superseded for sizing a run by `mhc-train plan` (mhc_train/plan/): this model covers activations only, in the
model's dtype (no autocast), with nothing for parameters, gradients, optimizer states, micro-batches in flight or
buffers. It stays as the per-component decomposition of the paper's Eq. 20 that `scripts/bench_recompute.py` prints
and `tests/parallel/test_recompute.py` checks against whole-model measurements.

The prediction composes measured components with the paper's connection terms (Eq. 20):
- `head`: embedding, stream expand/collapse, final norm, LM head and loss (measured once);
- `attn`, `ffn`: F proper (no RMSNorm), measured by running one sub-layer under the saved-tensor hook;
- `site_none`: everything one connection site keeps in the plain model beyond F proper (its RMSNorm, x_l, the
  coefficient path, y), measured once per sub-layer kind;
- `mhc` mode: F proper per site, plus `x_{l0}` (nC) per recompute block and F's output y (C) per site;
- `full` mode: only each group's input (nC) per block.
`scripts/bench_recompute.py` prints it for large presets; tests check it against whole-model measurements.
"""

from __future__ import annotations

import math

import torch

from mhc_train.model import lm_loss
from tools.measure import saved_bytes_for_backward


def _measure(fn, model) -> int:
    return saved_bytes_for_backward(fn, [*model.parameters(), *model.buffers()])


def component_bytes(model, batch: int = 1, seq_len: int = 64) -> dict:
    """Per-token bytes kept for backward by each component of `model` (measured on its device)."""
    dev = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    n, C = model.n_streams, model.cfg.dim
    tok = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), device=dev)
    layer = next(iter(model.layers.values()))
    x = torch.randn(batch, seq_len, n, C, device=dev, dtype=dtype, requires_grad=True)
    h = torch.randn(batch, seq_len, C, device=dev, dtype=dtype, requires_grad=True)
    ntok = batch * seq_len
    head = _measure(lambda: lm_loss(model.head(model.embed(tok[:, :-1])), tok[:, 1:]), model)  # no blocks
    out = {"head": head / ntok}
    (attn_site, attn_norm, attn_f, _), (ffn_site, ffn_norm, ffn_f, _) = layer.site_parts(model.rope)
    out["attn"] = _measure(lambda: attn_f(h), model) / ntok
    out["ffn"] = _measure(lambda: ffn_f(h), model) / ntok
    out["attn_site_none"] = _measure(lambda: attn_site(x, lambda v: attn_f(attn_norm(v))), model) / ntok - out["attn"]
    out["ffn_site_none"] = _measure(lambda: ffn_site(x, lambda v: ffn_f(ffn_norm(v))), model) / ntok - out["ffn"]
    out["element_size"] = torch.finfo(dtype).bits // 8
    return out


def predict_bytes_per_token(comp: dict, n_layer: int, n: int, C: int, mode: str, plan: list[tuple[int, int]]) -> dict:
    """Predicted bytes kept for backward per token, split into F proper, connection terms and the head."""
    L, e = 2 * n_layer, comp["element_size"]
    f_proper = n_layer * (comp["attn"] + comp["ffn"])
    blocks = len(plan)
    if mode == "none":
        conn = n_layer * (comp["attn_site_none"] + comp["ffn_site_none"])
        return {"head": comp["head"], "f_proper": f_proper, "connection": conn, "total": comp["head"] + f_proper + conn}
    if mode == "mhc":
        conn = blocks * n * C * e + L * C * e  # x_{l0} per block, y per site
        return {"head": comp["head"], "f_proper": f_proper, "connection": conn, "total": comp["head"] + f_proper + conn}
    if mode == "full":
        conn = blocks * n * C * e
        return {"head": comp["head"], "f_proper": 0.0, "connection": conn, "total": comp["head"] + conn}
    raise ValueError(f"unknown recompute mode {mode!r}")


def transient_peak_bytes_per_token(n: int, C: int, n_layer: int, block: int, element_size: int) -> float:
    """The paper's Eq. 20 peak of the mHC terms: nC * ceil(L / L_r) kept + (n + 2) C * L_r recomputed at once."""
    L = 2 * n_layer
    return (n * C * math.ceil(L / block) + (n + 2) * C * block) * element_size
