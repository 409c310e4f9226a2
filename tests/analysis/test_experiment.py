"""The demo path end to end on the test model (arms x seeds), and the comparison it writes."""

import json
import subprocess
from pathlib import Path

import pytest

from mhc_train.analysis import compare
from tests.support import launch

ARMS = ("residual", "hc", "mhc")


def _demo(out, overrides, *args):
    cmd = launch.cli_cmd("demo", "--out", str(out), *args, *overrides)
    return subprocess.run(cmd, cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_arms_over_seeds_and_reports_paired_intervals(prepared_data, tmp_path):
    out = tmp_path / "demo"
    overrides = [
        "model=test",
        "train=test",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.diag_every=2",
        f"data.out_dir={prepared_data}",
        "logging.wandb=false",
    ]
    proc = _demo(out, overrides, "--seeds", "0,1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "compare.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    for arm in ARMS:
        for seed in (0, 1):
            assert (out / arm / "lr0.003" / f"seed{seed}" / "checkpoints" / "step_00000004.pt").is_file()
    stats = json.loads((out / "summary.json").read_text())["seeds"]
    per_arm = {r["arm"]: r for r in stats["per_lr"]}
    assert set(per_arm) == set(ARMS) and all(r["seeds"] == [0, 1] and r["std"] is not None for r in per_arm.values())
    for arm in ("hc", "mhc"):
        d = per_arm[arm]["vs_residual"]
        assert d["n"] == 2 and d["ci_low"] < d["mean"] < d["ci_high"]
        assert f"- {arm} (lr 0.003): " in md and "95% CI [" in md
    hc_row = next(line for line in md.splitlines() if line.startswith("| hc/lr0.003/seed0 | hc |"))
    assert "| n/a |" in hc_row and "| - |" not in hc_row  # HC's H_res is never Sinkhorn-projected; all else logged
    bench = json.loads((out / "bench.json").read_text())
    assert bench["seeds"] == [0, 1] and len(bench["runs"]) == 6
    assert all(a["tokens_per_s"] > 0 and a["peak_mem_mb"] > 0 for a in bench["runs"].values())
    # seed k sees the same data in every arm; different seeds see different data
    tokens = {
        (arm, s): [
            json.loads(line)["loss"] for line in open(out / arm / "lr0.003" / f"seed{s}" / "metrics.jsonl")
            if '"kind": "train"' in line
        ][:1]
        for arm in ARMS for s in (0, 1)
    }  # fmt: skip
    assert tokens[("residual", 0)] != tokens[("residual", 1)]
    # rerunning resumes every finished run instead of retraining it
    proc = _demo(out, overrides, "--arms", "residual", "--seeds", "0,1")
    assert proc.returncode == 0 and proc.stdout.count("resumed from") == 2, proc.stdout + proc.stderr
    # a missing seed is said, not hidden
    runs = [out / a / "lr0.003" / f"seed{s}" for a in ARMS for s in (0, 1) if (a, s) != ("mhc", 1)]
    result = compare(runs, tmp_path / "cmp")
    assert "mhc at lr 0.003: seeds [0], residual has [0, 1]: paired over [0] only" in Path(result["md"]).read_text()
    assert result["rows"][0]["val_gap_vs_residual"] == 0.0 and result["rows"][1]["step_time_vs_residual"] > 0
