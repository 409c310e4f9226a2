"""Reading runs for the comparison: what a run directory holds, as one dict per run.

Reads only what runs wrote (`config.yaml`, `metrics.jsonl`, `summary.json`, `eval.json`), so it works on finished,
running or killed runs. Each run belongs to an arm (`arm`: recorded in `summary.json` at train time; for a run written
before that, `mhc_train.config.arm_name` of its `config.yaml`), a learning rate and a seed (`train.seed`, which fixes
the init and the data order, so seed k of every arm sees the same batches).

A blend run's val records carry each source's loss (`source_loss`); `load_run` flattens them to `loss/<source>`
keys of the same records, so `series(recs, "val", "loss/<source>")` reads them like any metric.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from mhc_train.config import arm_name
from mhc_train.errors import MhcTrainError
from mhc_train.io.rundir import RunDir
from mhc_train.train.metrics import read_metrics


class CompareError(MhcTrainError, ValueError):
    """The runs given cannot be compared as asked (the message names the runs and the fix)."""


def _label(run_dir: Path, recs: dict) -> str:
    meta = recs.get("meta", [{}])[-1]
    return f"{run_dir.name} ({meta.get('connection', '?')}, n={meta.get('n_streams', '?')})"


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"run directory {run_dir} does not exist; pass the directories `mhc-train train` wrote")
    recs = read_metrics(run_dir)
    for rec in recs.get("val", []):  # a blend: each source's val loss as a key of its own
        rec.update({f"loss/{k}": v for k, v in (rec.get("source_loss") or {}).items()})
    cfg_path = RunDir(run_dir).config
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not cfg and recs.get("meta"):
        cfg = {"connection": {"type": recs["meta"][-1].get("connection")}}
    summary_path = RunDir(run_dir).summary
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    eval_path = run_dir / "eval.json"  # written by `mhc-train eval` (mhc_train/infer/eval.py)
    evals = json.loads(eval_path.read_text()).get("tasks", {}) if eval_path.is_file() else {}
    return {
        "eval": {
            f"{task}/{metric}": value
            for task, rec in evals.items()
            for metric, value in rec.get("metrics", {}).items()
            if not metric.endswith("_stderr")
        },
        "dir": run_dir,
        "label": _label(run_dir, recs),
        "recs": recs,
        "summary": summary,
        "connection": recs.get("meta", [{}])[-1].get("connection"),
        "arm": summary.get("arm") or arm_name(cfg),  # recorded at train time; older runs: computed
        "seed": cfg.get("train", {}).get("seed"),
        "lr": cfg.get("optim", {}).get("lr"),
    }


def series(recs: dict, kind: str, key: str):
    rows = [r for r in recs.get(kind, []) if isinstance(r.get(key), (int, float))]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def val_at(run: dict, step: int | None) -> float | None:
    """Val loss at `step` (None: the last one logged)."""
    s, y = series(run["recs"], "val", "loss")
    if not len(y):
        return None
    if step is None:
        return float(y[-1])
    hit = y[s == step]
    return float(hit[0]) if len(hit) else None


def sources(run: dict) -> list[str]:
    """The blend sources whose val losses the run logged (none for a single-source run)."""
    return list(dict.fromkeys(k for r in run["recs"].get("val", []) for k in r.get("source_loss") or {}))


def mean_over_sites(last: dict, key: str) -> float | None:
    vals = [v[key] for v in last.get("sites", {}).values() if isinstance(v.get(key), (int, float))]
    return float(np.mean(vals)) if vals else None


def disambiguate(runs: list[dict]) -> list[str]:
    """Runs that share arm, LR and seed but differ otherwise (another model, schedule, ...) are not seeds of one arm:
    each becomes an arm of its own, named after its directory."""
    seen: dict = {}
    for r in runs:
        seen.setdefault((r.get("arm") or r["connection"], r.get("lr"), r.get("seed")), []).append(r)
    notes, names = [], run_names(runs)
    for (arm, lr, seed), same in seen.items():
        if len(same) > 1:
            for r in same:
                r["arm"] = f"{arm}:{names[id(r)]}"
            notes.append(
                f"{len(same)} runs of arm {arm} at lr {lr_str(lr)} with seed {seed} "
                f"({', '.join(names[id(r)] for r in same)}): compared as separate arms"
            )
    return notes


def run_names(runs: list[dict]) -> dict:
    """{id(run): its directory relative to the runs' common parent} (the directory name for a single run)."""
    if len(runs) < 2:
        return {id(r): r["dir"].name for r in runs}
    root = Path(os.path.commonpath([r["dir"].resolve() for r in runs]))
    return {id(r): str(r["dir"].resolve().relative_to(root)) or r["dir"].name for r in runs}


def lr_str(lr) -> str | None:
    return f"{lr:g}" if isinstance(lr, (int, float)) else lr
