"""Metrics: always a JSONL file in the run directory; wandb too (offline unless the user opts in).

Every line is `{"kind": ..., "step": ..., "segment": ..., ...}`. Each launch on a run directory appends under a new
segment number. Nothing already written is rewritten or lost: where a later segment logs a step an earlier one also
logged (a resume from a checkpoint older than the last record, a restart without a checkpoint), readers take the
later segment's record and say so (a warning naming the segments and steps); `read_metrics(..., segments=True)` gives
every record.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

from mhc_train.config import LoggingConfig
from mhc_train.io.rundir import RunDir


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, run_name: str, enabled: bool = True):
        self.path = RunDir(run_dir).metrics
        self.enabled = enabled
        self.segment = _last_segment(self.path) + 1 if enabled else 0
        self._file = open(self.path, "a") if enabled else None
        self._wandb = None
        if enabled and cfg.wandb and cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_entity or None,
                name=run_name,
                dir=str(run_dir),
                mode=cfg.wandb_mode,
                config=config_dict,
                resume="allow",
                id=_wandb_id(run_dir),
                reinit="finish_previous",
            )

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(_clean({"kind": kind, "step": step, "segment": self.segment, **values})) + "\n")
        self._file.flush()
        if self._wandb is not None:
            flat = {f"{kind}/{k}": v for k, v in _flatten(values).items() if isinstance(v, (int, float))}
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / ".wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def _records(path: Path):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue


def _last_segment(path: Path) -> int:
    if not path.is_file():
        return 0
    return max((rec.get("segment", 0) for rec in _records(path)), default=0)


def read_metrics(run_dir: str | Path, segments: bool = False) -> dict[str, list[dict]]:
    """{kind: [records sorted by step]}: for each (kind, step) the record of the latest segment that logged it (and
    within a segment the last written), with a warning when a later segment replaces earlier records. With
    `segments`, every record of every segment, in file order."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    if segments:
        out: dict[str, list[dict]] = {}
        for rec in _records(path):
            out.setdefault(rec["kind"], []).append(rec)
        return out
    latest: dict[tuple[str, int], dict] = {}
    replaced: dict[tuple[int, int], list[int]] = {}  # (old segment, new segment) -> steps
    for rec in _records(path):
        key, seg = (rec["kind"], rec["step"]), rec.get("segment", 0)
        old = latest.get(key)
        if old is not None and old.get("segment", 0) != seg and rec["kind"] != "meta":
            replaced.setdefault((old.get("segment", 0), seg), []).append(rec["step"])
        latest[key] = rec
    for (old, new), steps in replaced.items():
        warnings.warn(
            f"{path}: segment {new} replaces {len(steps)} record(s) of segment {old} at steps {min(steps)}-{max(steps)} "
            "(a later launch logged those steps again; read_metrics(..., segments=True) gives both)",
            stacklevel=2,
        )
    out = {}
    for (kind, _), rec in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        out.setdefault(kind, []).append(rec)
    return out
