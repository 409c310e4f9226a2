"""The demo / study runner: every arm x LR x seed of an experiment, each in its own process, then the comparison.

- Each run is `mhc-train train` in a fresh interpreter (fair peak-RSS numbers); seed k of every arm has the same init
  seed and data order (`train.seed`), and all runs share the schedule and the token budget.
- The config is loaded (and validated) once before any run, and the data prepared once before the arms.
- A re-run of the same command resumes every run from its last checkpoint (a finished run costs its resume check).
- Writes `bench.json` (per-run losses, throughput, memory, stability records, wall times) beside the comparison and
  prefixes `summary.md` with the experiment's setup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mhc_train.analysis.report import compare
from mhc_train.errors import MhcTrainError
from mhc_train.io.files import atomic_write_text
from mhc_train.train.metrics import read_metrics


class ExperimentError(MhcTrainError, RuntimeError):
    """One run of the experiment failed; the message names it, its run directory and how to continue."""


def stability_record(run_dir: Path) -> dict:
    """What the stability experiment reports per run: composite Amax gains over steps, and how often clipping acted."""
    recs = read_metrics(run_dir)
    train = recs.get("train", [])
    return {
        "composite_gain_over_steps": [
            {"step": d["step"], "fwd": d.get("composite_fwd_gain_max"), "bwd": d.get("composite_bwd_gain_max")}
            for d in recs.get("diag", [])
        ],
        "clipped_fraction_of_logged_steps": sum(bool(r.get("clipped")) for r in train) / len(train) if train else None,
        "grad_norm_max": max((r["grad_norm"] for r in train if "grad_norm" in r), default=None),
    }


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def _train_each(out: Path, base: list[str], arms, lrs, seeds) -> tuple[list[Path], dict]:
    """Train every (lr, arm, seed) in its own process, in that order; (run directories, wall seconds per run)."""
    run_dirs, timings = [], {}
    for lr in lrs:
        for arm in arms:
            for seed in seeds:
                run = out / arm / lr_tag(lr) / f"seed{seed}"
                overrides = [*base, f"connection={arm}", f"optim.lr={lr}", f"train.seed={seed}"]
                overrides += [f"run_name={out.name}/{arm}/{lr_tag(lr)}/seed{seed}", f"run_dir={run}"]
                print(f"== {arm} lr={lr:g} seed={seed} -> {run}", flush=True)
                t0 = time.time()
                cmd = [sys.executable, "-m", "mhc_train.cli", "train", *overrides]
                proc = subprocess.run(cmd, env=os.environ.copy())
                if proc.returncode != 0:
                    raise ExperimentError(
                        f"the {arm} arm (lr {lr:g}, seed {seed}) failed (exit {proc.returncode}); its run directory "
                        f"is {run}. Re-running the same command resumes every run from its last checkpoint"
                    )
                timings[f"{arm}/{lr_tag(lr)}/seed{seed}"] = time.time() - t0
                run_dirs.append(run)
    return run_dirs, timings


def _setup_lines(cfg, experiment: str, arms, seeds, lrs, n_runs: int, wall_s: float) -> list[str]:
    """The `## Setup` section that heads `summary.md`."""
    t = cfg.train
    if len(lrs) == 1:
        why = (
            f"every arm at the same peak LR {lrs[0]:g} (optim.lr of experiment={experiment}): one shared LR, "
            "not each arm's best; `--lrs a,b,c` sweeps it and the tables then show each arm at its own best LR"
        )
    else:
        why = (
            f"swept per arm over {', '.join(f'{lr:g}' for lr in lrs)}: each arm at its own best LR and at a shared one"
        )
    return [
        "## Setup",
        "",
        f"- experiment={experiment}: arms {', '.join(arms)}; seeds {seeds} (seed k: the same init seed "
        "and data order in every arm)",
        f"- {t.max_steps} steps of {t.batch_size} x {t.seq_len} tokens per run, {cfg.schedule.name} schedule, "
        f"grad clip {cfg.optim.grad_clip:g}",
        f"- LR: {why}",
        f"- wall time of this invocation {wall_s:.0f} s for {n_runs} runs, one after another "
        "(a run that was already finished counts only its resume check)",
        "",
    ]


def run_experiment(out, experiment: str, arms, seeds, lrs, overrides, command: str) -> dict:
    """Every arm x LR x seed of `configs/experiment/<experiment>.yaml` under `out`, then the comparison, `bench.json`
    and the setup section of `summary.md`. `lrs` None: the experiment's optim.lr; `command`: recorded in bench.json.
    Returns the comparison's result with `bench` (the benchmark record) added."""
    from mhc_train.config import load_config
    from mhc_train.data import prepare

    out = Path(out)
    base = [f"+experiment={experiment}", *overrides]
    cfg = load_config(base)  # fails here, before any run, on a bad override
    prepare(cfg.data)  # once, before the arms
    lrs = lrs or [cfg.optim.lr]
    t_start = time.time()
    run_dirs, timings = _train_each(out, base, arms, lrs, seeds)
    result = compare(run_dirs, out)
    bench = {
        "experiment": experiment,
        "command": command,
        "arms": arms,
        "seeds": seeds,
        "lrs": lrs,
        "runs": {
            r["run"]: {
                **{k: r[k] for k in ("final_val_loss", "tokens_per_s", "peak_mem_mb", "step_time_vs_residual")},
                **stability_record(run),
            }
            for r, run in zip(result["rows"], run_dirs)
        },
        "seed_statistics": result["stats"],
        "wall_s": timings,
        "total_wall_s": time.time() - t_start,
        "unigram_entropy": result["rows"][0]["unigram_entropy"],
    }
    atomic_write_text(out / "bench.json", json.dumps(bench, indent=2, default=str))
    setup = _setup_lines(cfg, experiment, arms, seeds, lrs, len(run_dirs), bench["total_wall_s"])
    md_path = Path(result["md"])
    title, rest = md_path.read_text().split("\n", 1)
    atomic_write_text(md_path, "\n".join([title, "", *setup]) + rest)
    return {**result, "bench": bench, "bench_path": str(out / "bench.json")}
