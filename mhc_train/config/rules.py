"""The three checks every config rule is written with (`validate.py`, `validate_moe.py`): each raises `ConfigError`
naming the key, the value and what is allowed, on one line."""

from __future__ import annotations

from typing import Any

from mhc_train.config.schema import ConfigError


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, f"allowed values are {', '.join(choices)}")


def at_least(key: str, value: Any, low: float, kind: type = int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value < low:
        fail(key, value, f"must be {'an integer' if kind is int else 'a number'} >= {low}")
