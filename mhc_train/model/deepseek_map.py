"""Lossless mapping of mHC parameters to and from DeepSeek-V4's names and layout (docs/mhc.md section 8).

Axis legend: n streams, C channels, K = n*n + 2n coefficient columns.

| ours (a model's state dict)            | DeepSeek-V4 (transformers `DeepseekV4Model`)  | layout                          |
|----------------------------------------|-----------------------------------------------|---------------------------------|
| `layers.{i}.attn_conn.phi` [nC, K]     | `layers.{i}.attn_hc.fn` [K, nC]               | transposed; res block permuted  |
| `layers.{i}.attn_conn.bias` [K]        | `layers.{i}.attn_hc.base` [K]                 | res block permuted              |
| `layers.{i}.attn_conn.alpha` [3]       | `layers.{i}.attn_hc.scale` [3]                | equal (pre, post, res / comb)   |
| `layers.{i}.ffn_conn.*`                | `layers.{i}.ffn_hc.*`                         | as attn                         |
| `collapse_conn.weight` [nC, n]         | `hc_head.hc_fn` [n, nC]                       | transposed                      |
| `collapse_conn.bias` [n], `.scale` [1] | `hc_head.hc_base` [n], `hc_head.hc_scale` [1] | equal                           |

The res block: our H_res is DeepSeek's `comb` transposed (their update is `comb^T x`), so our res column `2n + i n + j`
(H_res[i, j], row-major) is their row `2n + j n + i` (comb[j, i]). The permutation is its own inverse, so one index
serves both directions. Values are copied exactly (a permutation and a transpose): to and back is bit-identical.
Config: `hc_mult` = n_streams, `hc_sinkhorn_iters` = t_max, `hc_eps` = hc_eps, and the mHC input norm's
`rms_norm_eps` = connection.eps (DeepSeek shares it with the model's norms; we keep it apart).
"""

from __future__ import annotations

import math
import re

import torch

SITE_NAMES = {"phi": "fn", "bias": "base", "alpha": "scale"}  # ours -> DeepSeek's, within a site
HEAD_NAMES = {"weight": "hc_fn", "bias": "hc_base", "scale": "hc_scale"}  # collapse_conn -> hc_head
_SITE = re.compile(r"^(.*layers\.\d+\.)(attn|ffn)_conn\.(phi|bias|alpha)$")
_DS_SITE = re.compile(r"^(.*layers\.\d+\.)(attn|ffn)_hc\.(fn|base|scale)$")


def res_permutation(n: int, transpose_res: bool = True) -> torch.Tensor:
    """Index [K] taking our coefficient columns to DeepSeek's rows (and back: an involution). `transpose_res=False`
    (a negative control only) keeps the res block row-major in both frames, which is wrong."""
    index = torch.arange(n * n + 2 * n)
    if transpose_res:
        index[2 * n :] = 2 * n + torch.arange(n * n).view(n, n).t().reshape(-1)
    return index


def streams_of(k: int) -> int:
    """n from K = n*n + 2n."""
    n = math.isqrt(k + 1) - 1
    if n * n + 2 * n != k:
        raise ValueError(f"{k} coefficient columns are not n*n + 2n for any n")
    return n


def site_to_deepseek(phi, bias, alpha, transpose_res: bool = True) -> dict[str, torch.Tensor]:
    """One mHC site (phi [nC, K], bias [K], alpha [3]) -> DeepSeek's {fn [K, nC], base [K], scale [3]}."""
    perm = res_permutation(streams_of(phi.shape[1]), transpose_res).to(phi.device)
    return {"fn": phi[:, perm].t().contiguous(), "base": bias[perm].clone(), "scale": alpha.clone()}


def site_from_deepseek(fn, base, scale, transpose_res: bool = True) -> dict[str, torch.Tensor]:
    """DeepSeek's (fn [K, nC], base [K], scale [3]) -> our site's {phi [nC, K], bias [K], alpha [3]}."""
    perm = res_permutation(streams_of(fn.shape[0]), transpose_res).to(fn.device)
    return {"phi": fn[perm].t().contiguous(), "bias": base[perm].clone(), "alpha": scale.clone()}


def head_to_deepseek(weight, bias, scale) -> dict[str, torch.Tensor]:
    """The learned collapse (weight [nC, n], bias [n], scale [1]) -> {hc_fn [n, nC], hc_base, hc_scale}."""
    return {"hc_fn": weight.t().contiguous(), "hc_base": bias.clone(), "hc_scale": scale.clone()}


def head_from_deepseek(hc_fn, hc_base, hc_scale) -> dict[str, torch.Tensor]:
    return {"weight": hc_fn.t().contiguous(), "bias": hc_base.clone(), "scale": hc_scale.clone()}


def to_deepseek(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict with every mHC site and the learned collapse under DeepSeek's names and layouts; other keys
    (and a prefix such as `model.`) pass through unchanged."""
    out, sites = {}, {}
    for key, value in state.items():
        site, head = _SITE.match(key), key.rsplit("collapse_conn.", 1)
        if site:
            sites.setdefault((site[1], site[2]), {})[site[3]] = value
        elif len(head) == 2 and head[1] in HEAD_NAMES:
            out[f"{head[0]}hc_head.{HEAD_NAMES[head[1]]}"] = value.t().contiguous() if head[1] == "weight" else value
        else:
            out[key] = value
    for (prefix, kind), params in sites.items():
        if set(params) != set(SITE_NAMES):
            raise ValueError(f"{prefix}{kind}_conn has {sorted(params)}; DeepSeek's layout needs phi, bias and alpha")
        for name, value in site_to_deepseek(params["phi"], params["bias"], params["alpha"]).items():
            out[f"{prefix}{kind}_hc.{name}"] = value
    return out


def from_deepseek(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_deepseek`: DeepSeek's `attn_hc` / `ffn_hc` / `hc_head` keys back to ours."""
    out, sites = {}, {}
    back = {v: k for k, v in HEAD_NAMES.items()}
    for key, value in state.items():
        site, head = _DS_SITE.match(key), key.rsplit("hc_head.", 1)
        if site:
            sites.setdefault((site[1], site[2]), {})[site[3]] = value
        elif len(head) == 2 and head[1] in back:
            name = back[head[1]]
            out[f"{head[0]}collapse_conn.{name}"] = value.t().contiguous() if name == "weight" else value
        else:
            out[key] = value
    for (prefix, kind), params in sites.items():
        if set(params) != {"fn", "base", "scale"}:
            raise ValueError(f"{prefix}{kind}_hc has {sorted(params)}; expected fn, base and scale")
        for name, value in site_from_deepseek(params["fn"], params["base"], params["scale"]).items():
            out[f"{prefix}{kind}_conn.{name}"] = value
    return out


def is_deepseek_site_key(key: str) -> bool:
    """True for a DeepSeek-named site tensor (`layers.{i}.attn_hc.fn` ...), which `from_deepseek` maps only together
    with its site's other two."""
    return _DS_SITE.match(key) is not None


def deepseek_config_values(conn) -> dict:
    """The `DeepseekV4Config` fields a `ConnectionConfig` fixes (see the module docstring)."""
    return {"hc_mult": conn.n_streams, "hc_sinkhorn_iters": conn.t_max, "hc_eps": conn.hc_eps, "rms_norm_eps": conn.eps}
