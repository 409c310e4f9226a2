"""The arm a run belongs to: the name `compare` groups runs by, written by the trainer into `summary.json`.

`arm_name(cfg)` is the connection preset's `name:` plus a suffix for every override that changes the arm, so runs of
different arms are never pooled as seeds of one:
- the paper's arms are named by their values (`VALUE_NAMED`): an override of the read or H_res init turns `mhc` into
  `mhc_onehot`, `mhc_idres` or `mhc_hclike`, of `h_res` into `mhc_identity`, of `hc_dynamic` `hc` into `hc_static`
  (the names runs were compared under before presets carried names);
- any other preset keeps its `name:` (a new preset needs no edit here);
- `SUFFIXES`: `+clr<m>` for optim.connection_lr_mult != 1, `+nowd` for optim.connection_weight_decay=false.
- a value-named arm with `connection.numerics` or `connection.collapse` off their defaults gains `+deepseek_v4`,
  `+mean` or `+learned` (`_forms`), so e.g. `mhc connection.numerics=deepseek_v4` is not pooled with `mhc`.

The trainer records the name at train time; `mhc_train.analysis` reads it back, and computes it with this same
function from `config.yaml` only for run directories written before it was recorded (no `name:`, so by value).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# presets whose arm is named by the connection's values (and runs written before presets carried a name)
VALUE_NAMED = ("residual", "hc", "hc_static", "mhc", "mhc_onehot", "mhc_idres", "mhc_hclike", "mhc_identity")


def _clr(optim: dict) -> str:
    m = optim.get("connection_lr_mult", 1.0)
    return f"+clr{m:g}" if m != 1.0 else ""


def _nowd(optim: dict) -> str:
    return "+nowd" if optim.get("connection_weight_decay", True) is False else ""


# overrides outside connection.* that change the arm: (section, suffix(section values) -> "" when unchanged)
SUFFIXES = (("optim", _clr), ("optim", _nowd))


def _by_value(c: dict) -> str:
    """The arm of the paper's connections from their values: residual, hc, hc_static, mhc (symmetric init),
    mhc_hclike (one-hot read, near-identity H_res), mhc_onehot / mhc_idres (one of the two), mhc_identity."""
    kind = c.get("type", "?")
    if kind == "hc":
        return "hc" if c.get("hc_dynamic", True) else "hc_static"
    if kind != "mhc":
        return kind
    if c.get("h_res") == "identity":
        return "mhc_identity"
    one_hot, id_res = c.get("read_init") == "one_hot", c.get("b_res_init") == "identity"
    return {(True, True): "mhc_hclike", (True, False): "mhc_onehot", (False, True): "mhc_idres"}.get(
        (one_hot, id_res), "mhc"
    )


def _forms(c: dict) -> str:
    numerics, collapse = c.get("numerics", "paper"), c.get("collapse", "sum")
    return ("" if numerics == "paper" else f"+{numerics}") + ("" if collapse == "sum" else f"+{collapse}")


def arm_name(cfg: Any) -> str:
    """The arm of a `Config` or of a resolved config dict (a run's `config.yaml`); see the module docstring."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    c = cfg.get("connection") or {}
    name = c.get("name") or ""
    arm = _by_value(c) + _forms(c) if not name or name in VALUE_NAMED else name
    return arm + "".join(suffix(cfg.get(section) or {}) for section, suffix in SUFFIXES)
