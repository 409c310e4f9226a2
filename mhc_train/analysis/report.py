"""The comparison report: one row per run, markdown tables of the seed statistics, and `compare`, which writes
`compare.png`, `summary.md` and `summary.json` for a set of run directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mhc_train.analysis.plot import plot
from mhc_train.analysis.runs import (
    CompareError,
    disambiguate,
    load_run,
    lr_str,
    mean_over_sites,
    run_names,
    series,
    sources,
)
from mhc_train.analysis.stats import seed_statistics, val_at_or_before, verdict

# columns that have no meaning for some arms: shown as n/a there (not "-", which means "not logged")
NOT_APPLICABLE = {
    "sinkhorn_col_err_max": lambda arm: not arm.startswith("mhc") or arm.startswith("mhc_identity"),  # no projection
    "h_res_dist_uniform": lambda arm: arm == "residual",  # n = 1: J/n = I = 1
    "h_res_dist_identity": lambda arm: arm == "residual",
}


def summary_rows(runs: list[dict], step: int | None = None) -> list[dict]:
    """One row per run. `val_gap_vs_residual` is against the residual run of the same seed and LR (else the first
    residual run); losses are taken at `step` (None: each run's last val point)."""
    residuals = [r for r in runs if r["connection"] == "residual"]

    def base_of(r):
        same = [b for b in residuals if (b.get("seed"), b.get("lr")) == (r.get("seed"), r.get("lr"))]
        return (same or residuals or [None])[0]

    eval_cols = sorted({k for r in runs for k in r.get("eval", {})})
    source_cols = list(dict.fromkeys(k for r in runs for k in sources(r)))  # blend runs: val loss per source
    names = run_names(runs)
    has_moe = any("moe" in (r["recs"].get("diag") or [{}])[-1] for r in runs)
    rows = []
    for r in runs:
        base = base_of(r)
        val = val_at_or_before(r, step)
        base_val = val_at_or_before(base, step) if base else None
        _, train = series(r["recs"], "train", "loss")
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
            "lr": lr_str(r.get("lr")),
            "params": r["recs"].get("meta", [{}])[-1].get("n_params"),
            "final_train_loss": float(np.mean(train[-10:])) if len(train) else None,
            "final_val_loss": val,
            "val_gap_vs_residual": val - base_val if val is not None and base_val is not None else None,
            "tokens_per_s": tps,
            "step_time_vs_residual": base_tps / tps if tps and base_tps else None,
            "peak_mem_mb": r["summary"].get("peak_mem_mb"),
            "composite_bwd_gain_max": last.get("composite_bwd_gain_max"),
            "sinkhorn_col_err_max": last.get("sinkhorn_col_err_max"),
            "h_res_dist_uniform": last.get("h_res_dist_uniform_mean", mean_over_sites(last, "h_res_dist_uniform")),
            "h_res_dist_identity": last.get("h_res_dist_identity_mean", mean_over_sites(last, "h_res_dist_identity")),
            "unigram_entropy": r["recs"].get("meta", [{}])[-1].get("unigram_entropy"),
            **{col: r.get("eval", {}).get(col) for col in eval_cols},  # downstream scores (mhc-train eval)
            **{f"val_loss/{k}": _val_key(r, f"loss/{k}", step) for k in source_cols},
        }
        if has_moe:  # MoE runs: expert balance at the last diagnostic (worst layer)
            row.update(moe_columns(last))
        for col, na in NOT_APPLICABLE.items():
            if na(arm.split(":")[0]):  # "arm:run" when runs of one arm differ otherwise (`disambiguate`)
                row[col] = "n/a"
        rows.append(row)
    return rows


def _val_key(run: dict, key: str, step: int | None) -> float | None:
    """The val record's `key` at `step` (None: the last record that has it)."""
    s, y = series(run["recs"], "val", key)
    hit = y if step is None else y[s == step]
    return float(hit[-1]) if len(hit) else None


def moe_columns(diag: dict) -> dict:
    """The worst MoE layer's expert load (max over mean tokens per expert) and its router entropy, from a `diag`
    record (None for a dense run)."""
    layers = list(diag.get("moe", {}).values())
    worst = max(layers, key=lambda v: v.get("load_max_over_mean", 0.0), default={})
    return {"expert_load_max_over_mean": worst.get("load_max_over_mean"), "router_entropy": worst.get("router_entropy")}


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
                "lr": lr_str(r["lr"]),
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
        md += ["", f"### Every arm at the shared LR {lr_str(stats['shared_lr'])} (the residual's best)", ""]
        md += [_stat_table(stats["shared"]), ""]
    md += ["### Verdicts", ""]
    base_lr = next((r["lr"] for r in stats["best_lr"] if r["arm"] == "residual"), None)
    best = ", its best" if len({r["lr"] for r in stats["per_lr"]}) > 1 else ""
    for r in stats["best_lr"]:
        if r["vs_residual"] is not None:
            name = f"{r['arm']} (lr {lr_str(r['lr'])}{best})"
            md.append("- " + verdict(name, r["vs_residual"], f"residual (lr {lr_str(base_lr)}{best})"))
    if len({r["lr"] for r in stats["per_lr"]}) > 1:
        for r in stats["shared"]:
            if r["vs_residual"] is not None:
                md.append("- " + verdict(f"{r['arm']} at the shared lr {lr_str(r['lr'])}", r["vs_residual"]))
    if stats["notes"]:
        md += ["", "Notes:", *[f"- {n}" for n in stats["notes"]]]
    return md + [""]


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Write `compare.png`, `summary.md` and `summary.json` into out_dir; returns the per-run rows, the seed/LR
    statistics and the paths."""
    dirs = [Path(d).resolve() for d in run_dirs]
    if len(set(dirs)) < len(dirs):
        twice = sorted({str(d) for d in dirs if dirs.count(d) > 1})
        raise CompareError(f"run directory given twice: {', '.join(twice)}; pass each run once")
    runs = [load_run(d) for d in run_dirs]
    notes = disambiguate(runs)
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
