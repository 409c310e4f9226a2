"""The configuration compatibility rule: a configuration change never strands a saved run.

A checkpoint records the resolved config it was trained with. Reading it back under today's schema:
- a key absent from the saved config (added later) and at its default now is unchanged: a new key's default keeps
  the behaviour that existed before it;
- a key in the saved config that today's schema does not know (removed later) is dropped, with a one-line notice;
- any other difference is compared as before: a change of `model.*` / `connection.*` (but `connection.backend`, the
  same math in another implementation, and `connection.name`, the arm's label) changes the model and is fatal; the rest
  are allowed and listed.
"""

from __future__ import annotations

from dataclasses import asdict

from mhc_train.config import Config
from mhc_train.io.log import get_logger

log = get_logger(__name__)

# Keys whose change makes a checkpoint unusable: they change parameter shapes or the meaning of the weights.
FATAL_PREFIXES = ("model.", "connection.")
# Same model under another name or implementation: the backend (same math, another implementation) and the arm's
# label (`connection.name`, recorded since the presets carry one; a checkpoint from before it lacks the key).
SAFE_EXCEPTIONS = ("connection.backend", "connection.name")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a.b.c': value} of a nested dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def defaults() -> dict:
    """Today's schema defaults, flattened."""
    return flatten(asdict(Config()))


def _known(saved: dict, schema: dict, prefix: str, dropped: dict) -> dict:
    """`saved` without the keys the (nested) schema defaults `schema` lack; those go to `dropped` with their values."""
    out = {}
    for key, value in saved.items():
        if key not in schema:
            dropped.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        elif isinstance(value, dict) and isinstance(schema[key], dict):
            out[key] = _known(value, schema[key], f"{prefix}{key}.", dropped)
        else:
            out[key] = value
    return out


def drop_removed(saved: dict, where: str = "checkpoint") -> dict:
    """`saved` (a resolved config dict) without the keys today's schema does not know; logs one line naming them."""
    dropped: dict = {}
    kept = _known(saved, asdict(Config()), "", dropped)
    if dropped:
        names = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
        log.warning(f"{where}: dropped config keys this version no longer has (removed options): {names}")
    return kept


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(fatal differences, allowed differences) between a checkpoint's resolved config and this run's, as
    'key: old -> new' lines, under the rule above (keys unknown to today's schema are left out: `drop_removed`)."""
    a, b, default = flatten(saved), flatten(current), defaults()
    fatal, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if key not in b and key not in default:
            continue  # removed from the schema: dropped (drop_removed says so)
        if key not in a and key in default and b.get(key) == default[key]:
            continue  # added after the checkpoint and at its default: unchanged
        if key not in a and key in SAFE_EXCEPTIONS:
            continue  # a label or an implementation the checkpoint predates (e.g. connection.name): nothing changed
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            is_fatal = key.startswith(FATAL_PREFIXES) and key not in SAFE_EXCEPTIONS
            (fatal if is_fatal else allowed).append(line)
    return fatal, allowed
