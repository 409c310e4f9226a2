"""Statistics over seeds and learning rates: means and sample standard deviations, differences to the residual
baseline paired by seed with a 95% t-interval, each arm at its best LR and every arm at one shared LR.
"""

from __future__ import annotations

import math

import numpy as np

from mhc_train.analysis.runs import CompareError, lr_str, series, val_at


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


def common_step(runs: list[dict]) -> tuple[int | None, list[str]]:
    """The last val step every run logged (runs with different train.eval_every share fewer steps), and notes when
    the runs differ in length or share no val step (then each run's last val loss at or before the shortest run's
    end is taken: `val_at_or_before`)."""
    steps = {r["dir"]: set(series(r["recs"], "val", "loss")[0].astype(int).tolist()) for r in runs}
    ends = {d: max(s) for d, s in steps.items() if s}
    missing = [str(r["dir"]) for r in runs if r["dir"] not in ends]
    notes = [f"no val loss logged yet in {', '.join(missing)}: left out of the statistics"] if missing else []
    if not ends:
        return None, notes
    shared = set.intersection(*(steps[d] for d in ends))
    step = max(shared) if shared else min(ends.values())
    if len(set(ends.values())) > 1 or step < min(ends.values()):
        short = sorted({str(d) for d, e in ends.items() if e == min(ends.values())})
        notes.append(
            f"the runs differ in length or val steps (last val step {min(ends.values())} to {max(ends.values())}): "
            f"every loss in the statistics is taken at step {step}, the last one all runs logged (shortest: "
            f"{', '.join(short)})"
        )
    if not shared and notes:
        notes[-1] += "; they share no val step (train.eval_every differs), so each run's last val loss at or before it"
    return step, notes


def val_at_or_before(run: dict, step: int | None) -> float | None:
    """Val loss at `step`, else the last one logged before it (runs whose val steps miss `step`)."""
    val = val_at(run, step)
    if val is not None or step is None:
        return val
    s, y = series(run["recs"], "val", "loss")
    return float(y[s <= step][-1]) if (s <= step).any() else None


def grouped(runs: list[dict], step: int | None) -> dict:
    """{(arm, lr): {seed: final val loss at `step`}}; two runs of one (arm, lr, seed) are refused."""
    groups: dict = {}
    where: dict = {}
    for r in runs:
        val = val_at_or_before(r, step)
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
                f"{arm} at lr {lr_str(lr)}: seeds {sorted(by_seed)}, residual has {sorted(base)}: paired over "
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
