"""The cross-field rules of issue 29's recipe keys: the wsd schedule, per-document attention and data blends.

- Kept apart from validate.py (which calls `validate_recipe` and `validate_blend` once each), so these rules read
  together; they raise the same `ConfigError`, one line naming the key, the value and the fix.
- A blend's weights that do not sum to 1 are fine here (the loader normalises them, with a notice); a weight <= 0 or an
  entry without a source is an error.
"""

from __future__ import annotations

from typing import Any

from mhc_train.config.schema import DOCUMENT_MASK_KERNELS, WSD_DECAY_SHAPES, Config, ConfigError, DataConfig


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def validate_recipe(cfg: Config) -> None:
    """schedule=wsd's keys, and per-document attention against the parallel layout."""
    s, t = cfg.schedule, cfg.train
    if s.name == "wsd":
        if s.decay_shape not in WSD_DECAY_SHAPES:
            _fail("schedule.decay_shape", s.decay_shape, f"allowed values are {', '.join(WSD_DECAY_SHAPES)}")
        if not 0 <= s.decay_fraction <= 1:
            _fail("schedule.decay_fraction", s.decay_fraction, "must be in [0, 1]")
        if s.decay_start < 0 or (s.decay_start and s.decay_start >= t.max_steps):
            _fail(
                "schedule.decay_start",
                s.decay_start,
                f"must be 0 (by decay_fraction) or < train.max_steps={t.max_steps}",
            )
        if s.decay_start and s.decay_start < s.warmup_steps:
            _fail("schedule.decay_start", s.decay_start, f"must be >= schedule.warmup_steps={s.warmup_steps}")
    d = cfg.data
    if d.document_rope_restart and not d.document_mask:
        _fail("data.document_rope_restart", True, "restarts positions per document: set data.document_mask=true too")
    if d.document_mask_kernel not in DOCUMENT_MASK_KERNELS:
        _fail("data.document_mask_kernel", d.document_mask_kernel, f"allowed: {', '.join(DOCUMENT_MASK_KERNELS)}")
    if d.document_mask and d.document_mask_kernel == "flex" and t.device == "cpu":
        _fail("data.document_mask_kernel", "flex", "flex_attention has no backward on CPU: set it to auto or sdpa")
    if d.document_mask and cfg.parallel.pp > 1:
        _fail("data.document_mask", True, "later pipeline stages see no tokens to find documents in: set parallel.pp=1")


def validate_blend(d: DataConfig) -> None:
    """Each `data.blend` entry names a source and has a positive weight; labels are distinct."""
    names = []
    for i, entry in enumerate(d.blend):
        if not entry.source:
            _fail(f"data.blend[{i}].source", entry.source, "give the source (as data.source) of every blend entry")
        if not entry.weight > 0:
            _fail(f"data.blend[{i}].weight", entry.weight, "must be > 0 (remove the entry to leave a source out)")
        names.append(blend_label(entry.name, entry.source))
    if len(set(names)) != len(names):
        _fail("data.blend", names, "two entries share a label: give each a distinct name")


def blend_label(name: str, source: str) -> str:
    """An entry's label in the metrics: its `name`, else the source's last path part (without extension)."""
    if name:
        return name
    tail = source.rstrip("/").split("/")[-1].split(":")[-1]
    return tail.split(".")[0] or source
