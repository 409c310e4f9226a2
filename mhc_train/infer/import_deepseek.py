"""import-hf of an export written with `export --hc-names deepseek` (config.json `hc_names: deepseek`): its mHC sites
(`layers.{i}.attn_hc.fn/base/scale`) and learned collapse (`hc_head.*`) back under our names and layouts.

Notes:
- The mapping is `model.deepseek_map.from_deepseek` (a permutation and a transpose: bit-exact).
- Shards: a site's three tensors may lie in different safetensors shards; they wait in `pending` until the site is
  complete (`from_deepseek_names`), and `converted_shards` refuses an export that leaves any behind.
- config.json's DeepseekV4 connection fields (hc_mult, hc_sinkhorn_iters, hc_eps, rms_norm_eps) must equal what the
  recorded `mhc_train.connection` gives (`deepseek_map.deepseek_config_values`): one edited without the other is
  refused.
"""

from __future__ import annotations

from mhc_train.infer.errors import InferenceError
from mhc_train.model import deepseek_map


def hc_names_of(hf: dict) -> str:
    """The mHC parameter names of an mhc-train export: mhc (ours) or deepseek (`export --hc-names deepseek`)."""
    names = hf.get("hc_names", "mhc")
    if names not in ("mhc", "deepseek"):
        raise InferenceError(f"config.json hc_names={names!r} is not known (mhc or deepseek); export it again")
    return names


def from_deepseek_names(tensors: dict, pending: dict) -> dict:
    """One shard's tensors with DeepSeek-named sites (`*_hc.fn/base/scale`) and head (`hc_head.*`) under our names;
    a site whose three tensors are not all seen yet waits in `pending` (filled across shards)."""
    out = {}
    for key, t in tensors.items():
        (pending if deepseek_map.is_deepseek_site_key(key) else out)[key] = t
    stems = {k.rpartition(".")[0] for k in pending}
    for stem in stems:
        keys = [f"{stem}.{leaf}" for leaf in ("fn", "base", "scale")]
        if all(k in pending for k in keys):
            out.update({k: pending.pop(k) for k in keys})
    return deepseek_map.from_deepseek(out)


def check_deepseek_fields(hf: dict, conn) -> None:
    """A DeepSeek-named export's DeepseekV4 connection fields (hc_mult, hc_sinkhorn_iters, hc_eps, rms_norm_eps) must
    be the recorded connection's (`deepseek_map.deepseek_config_values`): one edited without the other is refused."""
    if hc_names_of(hf) != "deepseek":
        return
    for key, want in deepseek_map.deepseek_config_values(conn).items():
        if key in hf and hf[key] != want:
            raise InferenceError(f"config.json {key}={hf[key]!r} disagrees with its mhc_train.connection ({want!r}); "
                                 "edit both or export the checkpoint again")  # fmt: skip
