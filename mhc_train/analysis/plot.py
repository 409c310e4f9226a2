"""The comparison's figure: a 3 x 3 grid of losses, the paired gap to the residual, the LR sweep, gradient norms,
composite Amax gains, H_res distances, throughput and memory (matplotlib, Agg backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mhc_train.analysis.runs import lr_str, series, sources
from mhc_train.analysis.stats import seed_statistics


def _band(ax, runs: list[dict], kind: str, key: str, color, label: str, base: dict | None = None, ls="-") -> None:
    """Mean over seeds with a min-max band; `base` {seed: run}: plot the difference to it, paired by seed. `ls`: the
    line style that tells the two series of one arm in a panel apart (the colour is the arm's)."""
    curves = []
    for r in runs:
        s, y = series(r["recs"], kind, key)
        if base is not None:
            b = base.get(r.get("seed"))
            if b is None:
                continue
            bs, by = series(b["recs"], kind, key)
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
    ax.plot(
        steps,
        ys.mean(0),
        marker="o" if kind == "val" else None,
        ls=ls,
        ms=3,
        color=color,
        label=f"{label} (n={len(ys)})",
    )
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
        lab = f"{arm} (lr {lr_str(group[0].get('lr'))})"
        _band(ax_loss, group, "val", "loss", c, f"{lab} val")
        _band(ax_loss, group, "train", "loss", c, f"{lab} train", ls=":")
        for k in dict.fromkeys(k for r in group for k in sources(r)):  # a blend: each source's val loss
            _band(ax_loss, group, "val", f"loss/{k}", c, f"{lab} val {k}")
        if arm != "residual" and base:
            _band(ax_gap, group, "val", "loss", c, f"{lab} - residual (val, paired by seed)", base=base)
        _band(ax_gn, group, "train", "grad_norm", c, lab)
        _band(ax_comp, group, "diag", "composite_bwd_gain_max", c, f"{lab} backward")
        _band(ax_comp, group, "diag", "composite_fwd_gain_max", c, f"{lab} forward", ls="--")
        if arm != "residual":
            _band(ax_dist, group, "diag", "h_res_dist_uniform_mean", c, f"{lab} from J/n")
            _band(ax_dist, group, "diag", "h_res_dist_identity_mean", c, f"{lab} from I", ls="--")
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
        else:  # plain numbers: an offset axis draws a gain of 1.0 as "-1e-6 + 1" ticks that read as -1.0
            ax.ticklabel_format(axis="y", useOffset=False)
    ax_sweep.set_xscale("log")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
