"""Side-by-side comparison of runs (residual vs HC vs mHC): PNG plots and markdown tables, over seeds and LRs.

Reads only what runs wrote (`config.yaml`, `metrics.jsonl`, `summary.json`), so it works on finished, running or
killed runs. Each run belongs to an arm (its connection, `arm_name`), a learning rate and a seed (`train.seed`, which
fixes the init and the data order, so seed k of every arm sees the same batches). Per (arm, LR) the comparison
reports mean and standard deviation of the final val loss over seeds and the difference to the residual baseline
paired by seed, with a 95% t-interval; per arm it picks the best LR, and it reports every arm at one shared LR.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import yaml

from mhc_train.errors import MhcTrainError
from mhc_train.io.rundir import RunDir
from mhc_train.train.metrics import read_metrics


class CompareError(MhcTrainError, ValueError):
    """The runs given cannot be compared as asked (the message names the runs and the fix)."""


# ---- statistics --------------------------------------------------------------------------------------------------
def mean_std(values) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def paired_difference(arm: dict, base: dict, confidence: float = 0.95) -> dict:
    """`arm - base` paired by key (seed): mean, std, n, the two-sided t-interval and whether it excludes 0.

    arm, base: {seed: value}; only the seeds present in both count (`seeds` lists them)."""
    from scipy.stats import t as student_t

    seeds = sorted(set(arm) & set(base))
    d = [arm[s] - base[s] for s in seeds]
    out = {"n": len(d), "seeds": seeds, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    out["significant"] = None
    if not d:
        return out
    out["mean"], out["std"] = mean_std(d)
    if len(d) > 1:
        half = float(student_t.ppf(0.5 + confidence / 2, len(d) - 1)) * out["std"] / math.sqrt(len(d))
        out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
        out["significant"] = bool(out["ci_low"] > 0 or out["ci_high"] < 0)
    return out


def verdict(name: str, diff: dict, base: str = "residual") -> str:
    """One line: is `name` better or worse than `base`, and is the difference distinguishable from seed noise."""
    if diff["mean"] is None:
        return f"{name}: no seed in common with {base}, no comparison"
    if diff["ci_low"] is None:
        return f"{name}: {diff['mean']:+.4f} vs {base} from one seed: no interval, no verdict (run more seeds)"
    word = "better" if diff["mean"] < 0 else "worse"
    if diff["significant"]:
        sig = f"significantly {word} (the 95% CI excludes 0)"
    else:
        sig = "not significant (the 95% CI contains 0)"
    return (
        f"{name}: {diff['mean']:+.4f} vs {base} (95% CI [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}], "
        f"{diff['n']} seeds paired): {sig}"
    )


# ---- runs ---------------------------------------------------------------------------------------------------------
def arm_name(cfg: dict) -> str:
    """The arm a run belongs to, from its resolved config: residual, hc, hc_static, mhc (symmetric init),
    mhc_hclike (one-hot read, near-identity H_res), mhc_onehot / mhc_idres (one of the two), mhc_identity; with
    `+clr<m>` for optim.connection_lr_mult != 1 and `+nowd` for optim.connection_weight_decay=false."""
    c = cfg.get("connection", {})
    kind = c.get("type", "?")
    if kind == "hc":
        name = "hc" if c.get("hc_dynamic", True) else "hc_static"
    elif kind != "mhc":
        name = kind
    elif c.get("h_res") == "identity":
        name = "mhc_identity"
    else:
        one_hot, id_res = c.get("read_init") == "one_hot", c.get("b_res_init") == "identity"
        name = {(True, True): "mhc_hclike", (True, False): "mhc_onehot", (False, True): "mhc_idres"}.get(
            (one_hot, id_res), "mhc"
        )
    o = cfg.get("optim", {})
    if o.get("connection_lr_mult", 1.0) != 1.0:
        name += f"+clr{o['connection_lr_mult']:g}"
    if o.get("connection_weight_decay", True) is False:
        name += "+nowd"
    return name


# columns that have no meaning for some arms: shown as n/a there (not "-", which means "not logged")
NOT_APPLICABLE = {
    "sinkhorn_col_err_max": lambda arm: not arm.startswith("mhc") or arm.startswith("mhc_identity"),  # no projection
    "h_res_dist_uniform": lambda arm: arm == "residual",  # n = 1: J/n = I = 1
    "h_res_dist_identity": lambda arm: arm == "residual",
}


def _label(run_dir: Path, recs: dict) -> str:
    meta = recs.get("meta", [{}])[-1]
    return f"{run_dir.name} ({meta.get('connection', '?')}, n={meta.get('n_streams', '?')})"


def _smooth(y: np.ndarray, k: int = 10) -> np.ndarray:
    if len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CompareError(f"run directory {run_dir} does not exist; pass the directories `mhc-train train` wrote")
    recs = read_metrics(run_dir)
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
        "arm": arm_name(cfg),
        "seed": cfg.get("train", {}).get("seed"),
        "lr": cfg.get("optim", {}).get("lr"),
    }


def _series(recs: dict, kind: str, key: str):
    rows = [r for r in recs.get(kind, []) if isinstance(r.get(key), (int, float))]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def _diag_series(recs: dict, key: str):
    return _series(recs, "diag", key)


def _val_at(run: dict, step: int | None) -> float | None:
    """Val loss at `step` (None: the last one logged)."""
    s, y = _series(run["recs"], "val", "loss")
    if not len(y):
        return None
    if step is None:
        return float(y[-1])
    hit = y[s == step]
    return float(hit[0]) if len(hit) else None


def _mean_over_sites(last: dict, key: str) -> float | None:
    vals = [v[key] for v in last.get("sites", {}).values() if isinstance(v.get(key), (int, float))]
    return float(np.mean(vals)) if vals else None


def summary_rows(runs: list[dict], step: int | None = None) -> list[dict]:
    """One row per run. `val_gap_vs_residual` is against the residual run of the same seed and LR (else the first
    residual run); losses are taken at `step` (None: each run's last val point)."""
    residuals = [r for r in runs if r["connection"] == "residual"]

    def base_of(r):
        same = [b for b in residuals if (b.get("seed"), b.get("lr")) == (r.get("seed"), r.get("lr"))]
        return (same or residuals or [None])[0]

    eval_cols = sorted({k for r in runs for k in r.get("eval", {})})
    names = _run_names(runs)
    rows = []
    for r in runs:
        base = base_of(r)
        val = _val_at(r, step)
        base_val = _val_at(base, step) if base else None
        _, train = _series(r["recs"], "train", "loss")
        diag = r["recs"].get("diag", [])
        last = diag[-1] if diag else {}
        tps = r["summary"].get("tokens_per_s")
        base_tps = base["summary"].get("tokens_per_s") if base else None
        arm = r.get("arm") or r["connection"]
        row = {
            "run": names[id(r)],
            "arm": arm,
            "connection": r["connection"],
            "seed": r.get("seed"),
            "lr": _lr_str(r.get("lr")),
            "params": r["recs"].get("meta", [{}])[-1].get("n_params"),
            "final_train_loss": float(np.mean(train[-10:])) if len(train) else None,
            "final_val_loss": val,
            "val_gap_vs_residual": val - base_val if val is not None and base_val is not None else None,
            "tokens_per_s": tps,
            "step_time_vs_residual": base_tps / tps if tps and base_tps else None,
            "peak_mem_mb": r["summary"].get("peak_mem_mb"),
            "composite_bwd_gain_max": last.get("composite_bwd_gain_max"),
            "sinkhorn_col_err_max": last.get("sinkhorn_col_err_max"),
            "h_res_dist_uniform": last.get("h_res_dist_uniform_mean", _mean_over_sites(last, "h_res_dist_uniform")),
            "h_res_dist_identity": last.get("h_res_dist_identity_mean", _mean_over_sites(last, "h_res_dist_identity")),
            "unigram_entropy": r["recs"].get("meta", [{}])[-1].get("unigram_entropy"),
            **{col: r.get("eval", {}).get(col) for col in eval_cols},  # downstream scores (mhc-train eval)
        }
        for col, na in NOT_APPLICABLE.items():
            if na(arm.split(":")[0]):  # "arm:run" when runs of one arm differ otherwise (`_disambiguate`)
                row[col] = "n/a"
        rows.append(row)
    return rows


# ---- seeds and learning rates -------------------------------------------------------------------------------------
def common_step(runs: list[dict]) -> tuple[int | None, list[str]]:
    """The last val step every run reached, and a note when the runs differ in length."""
    ends = {r["dir"]: int(_series(r["recs"], "val", "loss")[0][-1]) for r in runs if r["recs"].get("val")}
    missing = [str(r["dir"]) for r in runs if not r["recs"].get("val")]
    notes = [f"no val loss logged yet in {', '.join(missing)}: left out of the statistics"] if missing else []
    if not ends:
        return None, notes
    step = min(ends.values())
    if len(set(ends.values())) > 1:
        short = sorted({str(d) for d, e in ends.items() if e == step})
        notes.append(
            f"the runs differ in length (last val step {min(ends.values())} to {max(ends.values())}): every loss "
            f"in the statistics is taken at step {step}, the last one all runs reached (shortest: {', '.join(short)})"
        )
    return step, notes


def grouped(runs: list[dict], step: int | None) -> dict:
    """{(arm, lr): {seed: final val loss at `step`}}; two runs of one (arm, lr, seed) are refused."""
    groups: dict = {}
    where: dict = {}
    for r in runs:
        val = _val_at(r, step)
        if val is None:
            continue
        key, seed = (r.get("arm") or r["connection"], r.get("lr")), r.get("seed")
        if seed in groups.setdefault(key, {}):
            raise CompareError(
                f"two runs of arm {key[0]} at lr {key[1]} with seed {seed}: {where[key + (seed,)]} and {r['dir']}; "
                "pass one of them (or give them different train.seed values)"
            )
        groups[key][seed] = val
        where[key + (seed,)] = r["dir"]
    return groups


def _disambiguate(runs: list[dict]) -> list[str]:
    """Runs that share arm, LR and seed but differ otherwise (another model, schedule, ...) are not seeds of one arm:
    each becomes an arm of its own, named after its directory."""
    seen: dict = {}
    for r in runs:
        seen.setdefault((r.get("arm") or r["connection"], r.get("lr"), r.get("seed")), []).append(r)
    notes, names = [], _run_names(runs)
    for (arm, lr, seed), same in seen.items():
        if len(same) > 1:
            for r in same:
                r["arm"] = f"{arm}:{names[id(r)]}"
            notes.append(
                f"{len(same)} runs of arm {arm} at lr {_lr_str(lr)} with seed {seed} "
                f"({', '.join(names[id(r)] for r in same)}): compared as separate arms"
            )
    return notes


def _run_names(runs: list[dict]) -> dict:
    """{id(run): its directory relative to the runs' common parent} (the directory name for a single run)."""
    if len(runs) < 2:
        return {id(r): r["dir"].name for r in runs}
    root = Path(os.path.commonpath([r["dir"].resolve() for r in runs]))
    return {id(r): str(r["dir"].resolve().relative_to(root)) or r["dir"].name for r in runs}


def seed_statistics(runs: list[dict]) -> dict:
    """Per (arm, LR): mean and std over seeds, and the paired difference to the residual at the same LR; per arm:
    its best LR and the paired difference of arm-at-its-best to residual-at-its-best; every arm at the shared LR
    (the residual's best). Notes say what was left out (missing seeds, shorter runs)."""
    step, notes = common_step(runs)
    groups = grouped(runs, step)
    rows = []
    for (arm, lr), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0] != "residual", kv[0][0], kv[0][1])):
        mean, std = mean_std(by_seed.values())
        base = groups.get(("residual", lr))
        diff = paired_difference(by_seed, base) if base is not None and arm != "residual" else None
        if diff is not None and set(by_seed) != set(base):
            notes.append(
                f"{arm} at lr {_lr_str(lr)}: seeds {sorted(by_seed)}, residual has {sorted(base)}: paired over "
                f"{diff['seeds']} only"
            )
        rows.append({"arm": arm, "lr": lr, "seeds": sorted(by_seed), "mean": mean, "std": std, "vs_residual": diff})
    best = {}
    for row in rows:
        if row["arm"] not in best or row["mean"] < best[row["arm"]]["mean"]:
            best[row["arm"]] = row
    best_rows = []
    base_best = best.get("residual")
    for arm, row in best.items():
        diff = None
        if base_best is not None and arm != "residual":
            diff = paired_difference(groups[(arm, row["lr"])], groups[("residual", base_best["lr"])])
        best_rows.append({**row, "vs_residual": diff})
    shared_lr = base_best["lr"] if base_best else None
    shared = [r for r in rows if r["lr"] == shared_lr]
    return {
        "step": step,
        "per_lr": rows,
        "best_lr": best_rows,
        "shared_lr": shared_lr,
        "shared": shared,
        "notes": notes,
    }


def _lr_str(lr) -> str | None:
    return f"{lr:g}" if isinstance(lr, (int, float)) else lr


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.1e}"
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _stat_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        d = r["vs_residual"] or {}
        ci = f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" if d.get("ci_low") is not None else "-"
        sig = {True: "yes", False: "no", None: "-"}[d.get("significant")]
        out.append(
            {
                "arm": r["arm"],
                "lr": _lr_str(r["lr"]),
                "seeds": len(r["seeds"]),
                "val loss mean": r["mean"],
                "std": r["std"],
                "paired diff vs residual": d.get("mean"),
                "95% CI": ci,
                "significant": sig if r["arm"] != "residual" else "n/a",
            }
        )
    return markdown_table(out)


def stats_markdown(stats: dict) -> list[str]:
    if not stats["per_lr"]:
        return []
    step = stats["step"]
    md = [f"## Over seeds (val loss at step {step}; difference to the residual baseline paired by seed)", ""]
    md += ["### Every arm and LR (vs the residual at the same LR)", "", _stat_table(stats["per_lr"]), ""]
    if len({r["lr"] for r in stats["per_lr"]}) > 1:
        md += ["### Each arm at its own best LR (vs the residual at its best LR)", "", _stat_table(stats["best_lr"])]
        md += ["", f"### Every arm at the shared LR {_lr_str(stats['shared_lr'])} (the residual's best)", ""]
        md += [_stat_table(stats["shared"]), ""]
    md += ["### Verdicts", ""]
    base_lr = next((r["lr"] for r in stats["best_lr"] if r["arm"] == "residual"), None)
    best = ", its best" if len({r["lr"] for r in stats["per_lr"]}) > 1 else ""
    for r in stats["best_lr"]:
        if r["vs_residual"] is not None:
            name = f"{r['arm']} (lr {_lr_str(r['lr'])}{best})"
            md.append("- " + verdict(name, r["vs_residual"], f"residual (lr {_lr_str(base_lr)}{best})"))
    if len({r["lr"] for r in stats["per_lr"]}) > 1:
        for r in stats["shared"]:
            if r["vs_residual"] is not None:
                md.append("- " + verdict(f"{r['arm']} at the shared lr {_lr_str(r['lr'])}", r["vs_residual"]))
    if stats["notes"]:
        md += ["", "Notes:", *[f"- {n}" for n in stats["notes"]]]
    return md + [""]


# ---- plots ----------------------------------------------------------------------------------------------------------
def _band(ax, runs: list[dict], kind: str, key: str, color, label: str, base: dict | None = None) -> None:
    """Mean over seeds with a min-max band; `base` {seed: run}: plot the difference to it, paired by seed."""
    curves = []
    for r in runs:
        s, y = _series(r["recs"], kind, key)
        if base is not None:
            b = base.get(r.get("seed"))
            if b is None:
                continue
            bs, by = _series(b["recs"], kind, key)
            s, i, j = np.intersect1d(s, bs, return_indices=True)
            y = y[i] - by[j]
        if len(s):
            curves.append(dict(zip(s.tolist(), y.tolist())))
    if not curves:
        return
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    if not steps:
        return
    ys = np.array([[c[s] for s in steps] for c in curves])
    ax.plot(steps, ys.mean(0), "o-" if kind == "val" else "-", ms=3, color=color, label=f"{label} (n={len(ys)})")
    if len(ys) > 1:
        ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.2)


def plot(runs: list[dict], out_png: Path, stats: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = stats or seed_statistics(runs)
    best_lr = {r["arm"]: r["lr"] for r in stats["best_lr"]}
    arms = list(dict.fromkeys(r.get("arm") or r["connection"] for r in runs))
    color = {arm: f"C{i}" for i, arm in enumerate(arms)}

    def of(arm, lr=None):
        return [r for r in runs if (r.get("arm") or r["connection"]) == arm and r.get("lr") == best_lr.get(arm, lr)]

    fig, axes = plt.subplots(3, 3, figsize=(20, 15))
    (ax_loss, ax_gap, ax_sweep), (ax_gn, ax_amax, ax_comp), (ax_dist, ax_tps, ax_mem) = axes
    base = {r.get("seed"): r for r in of("residual")}
    for arm in arms:
        c, group = color[arm], of(arm)
        if not group:
            continue
        lab = f"{arm} (lr {_lr_str(group[0].get('lr'))})"
        _band(ax_loss, group, "val", "loss", c, f"{lab} val")
        _band(ax_loss, group, "train", "loss", c, f"{lab} train")
        if arm != "residual" and base:
            _band(ax_gap, group, "val", "loss", c, f"{lab} - residual (val, paired by seed)", base=base)
        _band(ax_gn, group, "train", "grad_norm", c, lab)
        _band(ax_comp, group, "diag", "composite_bwd_gain_max", c, f"{lab} backward")
        _band(ax_comp, group, "diag", "composite_fwd_gain_max", c, f"{lab} forward")
        if arm != "residual":
            _band(ax_dist, group, "diag", "h_res_dist_uniform_mean", c, f"{lab} from J/n")
            _band(ax_dist, group, "diag", "h_res_dist_identity_mean", c, f"{lab} from I")
        diag = group[0]["recs"].get("diag", [])
        if diag:
            sites = diag[-1]["sites"]
            names = list(sites)
            ax_amax.plot(range(len(names)), [sites[n]["composite_bwd_gain"] for n in names], "o-", color=c, label=lab)
    for arm in arms:  # the LR sweep: final val loss per LR, mean with a std bar over seeds
        rows = sorted((r for r in stats["per_lr"] if r["arm"] == arm), key=lambda r: r["lr"])
        if rows:
            lrs = [r["lr"] for r in rows]
            ax_sweep.plot(lrs, [r["mean"] for r in rows], "o-", color=color[arm], label=arm)
            ax_sweep.errorbar(lrs, [r["mean"] for r in rows], yerr=[r["std"] or 0 for r in rows], color=color[arm])
    by_arm = {arm: of(arm) for arm in arms}
    names = [a for a in arms if by_arm[a]]
    for ax, key in ((ax_tps, "tokens_per_s"), (ax_mem, "peak_mem_mb")):
        vals = [np.mean([r["summary"].get(key) or 0 for r in by_arm[a]]) for a in names]
        ax.bar(names, vals, color=[color[a] for a in names])
    ent = next((r["recs"].get("meta", [{}])[-1].get("unigram_entropy") for r in runs), None)
    if ent:
        ax_loss.axhline(ent, color="gray", ls=":", label=f"unigram entropy {ent:.2f}")
    ax_gap.axhline(0, color="gray", lw=0.8)
    titles = [
        ("loss, each arm at its best LR (mean over seeds, band: min-max)", "step", "loss (nats/token)"),
        ("val loss gap vs residual, paired by seed (< 0 is better)", "step", "delta loss"),
        (f"LR sweep: val loss at step {stats['step']} (bar: std over seeds)", "peak LR", "loss"),
        ("global grad norm (pre-clip)", "step", "norm"),
        ("composite backward Amax gain per site, last diagnostic", "site (attn, ffn per block)", "gain"),
        ("composite Amax gain (max over sites) over steps", "step", "gain"),
        ("H_res distance (Frobenius, mean over sites) over steps", "step", "distance"),
        ("throughput (mean over seeds)", "", "tokens / s"),
        ("peak memory", "", "MiB"),
    ]
    for ax, (title, xl, yl) in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if ax not in (ax_tps, ax_mem) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in (ax_gn, ax_amax, ax_comp):  # log only where the values span a decade (gains of ~1 read badly)
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 10:
            ax.set_yscale("log")
    ax_sweep.set_xscale("log")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Write `compare.png`, `summary.md` and `summary.json` into out_dir; returns the per-run rows, the seed/LR
    statistics and the paths."""
    dirs = [Path(d).resolve() for d in run_dirs]
    if len(set(dirs)) < len(dirs):
        twice = sorted({str(d) for d in dirs if dirs.count(d) > 1})
        raise CompareError(f"run directory given twice: {', '.join(twice)}; pass each run once")
    runs = [load_run(d) for d in run_dirs]
    notes = _disambiguate(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = seed_statistics(runs)
    stats["notes"] = notes + stats["notes"]
    plot(runs, out / "compare.png", stats)
    rows = summary_rows(runs, stats["step"])
    md = ["# Run comparison", "", *stats_markdown(stats), "## Per run", "", markdown_table(rows), ""]
    md.append(
        "Loss in nats/token on the fixed validation slice; gap < 0 means better than the residual baseline (same "
        "seed and LR). Composite gain: max over sites of the backward Amax gain of H_L...H_l at the last diagnostic "
        "step. h_res_dist_*: mean over sites of the Frobenius distance of H_res from J/n (the symmetric init) and "
        "from I. n/a: no meaning for that arm (no Sinkhorn projection; n = 1); -: not logged."
    )
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps({"runs": rows, "seeds": stats}, indent=2, default=str))
    return {"rows": rows, "stats": stats, "png": str(out / "compare.png"), "md": str(out / "summary.md")}
