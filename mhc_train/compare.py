"""Side-by-side comparison of runs (residual vs HC vs mHC): PNG plots and a markdown table.

Reads only what runs wrote (`metrics.jsonl`, `summary.json`), so it works on finished, running or killed runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mhc_train.rundir import RunDir
from mhc_train.train.metrics import read_metrics


def _label(run_dir: Path, recs: dict) -> str:
    meta = recs.get("meta", [{}])[-1]
    return f"{run_dir.name} ({meta.get('connection', '?')}, n={meta.get('n_streams', '?')})"


def _smooth(y: np.ndarray, k: int = 10) -> np.ndarray:
    if len(y) < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
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
    }


def _series(recs: dict, kind: str, key: str):
    rows = [r for r in recs.get(kind, []) if isinstance(r.get(key), (int, float))]
    return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


def summary_rows(runs: list[dict]) -> list[dict]:
    base = next((r for r in runs if r["connection"] == "residual"), None)
    base_val = _series(base["recs"], "val", "loss")[1][-1] if base and base["recs"].get("val") else None
    base_tps = base["summary"].get("tokens_per_s") if base else None
    eval_cols = sorted({k for r in runs for k in r.get("eval", {})})
    rows = []
    for r in runs:
        _, val = _series(r["recs"], "val", "loss")
        _, train = _series(r["recs"], "train", "loss")
        diag = r["recs"].get("diag", [])
        last = diag[-1] if diag else {}
        tps = r["summary"].get("tokens_per_s")
        rows.append(
            {
                "run": r["dir"].name,
                "connection": r["connection"],
                "params": r["recs"].get("meta", [{}])[-1].get("n_params"),
                "final_train_loss": float(np.mean(train[-10:])) if len(train) else None,
                "final_val_loss": float(val[-1]) if len(val) else None,
                "val_gap_vs_residual": float(val[-1] - base_val) if len(val) and base_val is not None else None,
                "tokens_per_s": tps,
                "step_time_vs_residual": base_tps / tps if tps and base_tps else None,
                "peak_mem_mb": r["summary"].get("peak_mem_mb"),
                "composite_bwd_gain_max": last.get("composite_bwd_gain_max"),
                "sinkhorn_col_err_max": last.get("sinkhorn_col_err_max"),
                "unigram_entropy": r["recs"].get("meta", [{}])[-1].get("unigram_entropy"),
                **{col: r.get("eval", {}).get(col) for col in eval_cols},  # downstream scores (mhc-train eval)
            }
        )
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(runs: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    ax_loss, ax_gap, ax_gn, ax_amax, ax_tps, ax_mem = axes.flat
    base = next((r for r in runs if r["connection"] == "residual"), None)
    for i, r in enumerate(runs):
        color = f"C{i}"
        s, y = _series(r["recs"], "train", "loss")
        if len(y):
            k = min(10, len(y))
            ax_loss.plot(s[k - 1 :], _smooth(y, k), color=color, alpha=0.6, label=f"{r['label']} train")
        vs, vy = _series(r["recs"], "val", "loss")
        ax_loss.plot(vs, vy, "o-", color=color, label=f"{r['label']} val")
        if base is not None and r is not base:
            bs, by = _series(base["recs"], "val", "loss")
            common = np.intersect1d(bs, vs)
            gap = [vy[vs == c][0] - by[bs == c][0] for c in common]
            ax_gap.plot(common, gap, "o-", color=color, label=f"{r['label']} - residual (val)")
            ts, ty = _series(r["recs"], "train", "loss")
            bts, bty = _series(base["recs"], "train", "loss")
            common_t = np.intersect1d(ts, bts)
            if len(common_t) > 10:
                g = np.array([ty[ts == c][0] - bty[bts == c][0] for c in common_t])
                ax_gap.plot(
                    common_t[9:], _smooth(g, 10), color=color, alpha=0.4, label=f"{r['label']} (train, smoothed)"
                )
        gs, gy = _series(r["recs"], "train", "grad_norm")
        ax_gn.plot(gs, gy, color=color, label=r["label"])
        diag = r["recs"].get("diag", [])
        if diag:
            sites = diag[-1]["sites"]
            names = list(sites)
            ax_amax.plot(
                range(len(names)),
                [sites[n]["composite_bwd_gain"] for n in names],
                "o-",
                color=color,
                label=f"{r['label']} backward",
            )
            ax_amax.plot(
                range(len(names)),
                [sites[n]["composite_fwd_gain"] for n in names],
                "x--",
                color=color,
                label=f"{r['label']} forward",
            )
    rows = summary_rows(runs)
    names = [r["run"] for r in rows]
    ax_tps.bar(names, [r["tokens_per_s"] or 0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
    ax_mem.bar(names, [r["peak_mem_mb"] or 0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
    ent = rows[0].get("unigram_entropy")
    if ent:
        ax_loss.axhline(ent, color="gray", ls=":", label=f"unigram entropy {ent:.2f}")
    ax_gap.axhline(0, color="gray", lw=0.8)
    titles = [
        ("train (smoothed) and val loss", "step", "loss (nats/token)"),
        ("loss gap vs the residual baseline (< 0 is better)", "step", "delta loss"),
        ("global grad norm (pre-clip)", "step", "norm"),
        ("composite Amax gain per site, last diagnostic step", "site (attn, ffn per block)", "gain"),
        ("throughput", "", "tokens / s"),
        ("peak memory", "", "MiB"),
    ]
    for ax, (title, xl, yl) in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        if ax not in (ax_tps, ax_mem) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_gn.set_yscale("log")
    ax_amax.set_yscale("log")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Write `compare.png`, `summary.md` and `summary.json` into out_dir; returns the summary rows."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "compare.png")
    rows = summary_rows(runs)
    md = [
        "# Run comparison",
        "",
        markdown_table(rows),
        "",
        "Loss in nats/token on the fixed validation slice; gap < 0 means better than the residual baseline. "
        "Composite gain: max over sites of the backward Amax gain of H_L...H_l at the last diagnostic step.",
    ]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return {"rows": rows, "png": str(out / "compare.png"), "md": str(out / "summary.md")}
