"""The three-arm demo path end to end on the test model, and the comparison it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mhc_train.compare import compare

REPO = Path(__file__).resolve().parents[2]


def _demo(out, overrides):
    cmd = [sys.executable, "-m", "mhc_train.cli", "demo", "--out", str(out), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300)


def test_demo_runs_three_arms_and_writes_the_comparison(prepared_data, tmp_path):
    out = tmp_path / "demo"
    overrides = [
        "model=test",
        "train=test",
        "train.max_steps=6",
        f"data.out_dir={prepared_data}",
        "logging.wandb=false",
    ]
    proc = _demo(out, overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "compare.png").stat().st_size > 10_000
    md = (out / "summary.md").read_text()
    for arm in ("residual", "hc", "mhc"):
        assert f"| {arm} | {arm} |" in md
        assert (out / arm / "checkpoints" / "step_00000006.pt").is_file()
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["arms"]) == {"residual", "hc", "mhc"}
    assert all(a["tokens_per_s"] > 0 and a["peak_mem_mb"] > 0 for a in bench["arms"].values())
    # identical data order and budget: every arm logged the same steps and token counts
    tokens = {
        arm: [json.loads(line).get("tokens") for line in open(out / arm / "metrics.jsonl") if '"kind": "train"' in line]
        for arm in ("residual", "hc", "mhc")
    }
    assert tokens["residual"] == tokens["hc"] == tokens["mhc"]
    # rerunning resumes every finished arm instead of retraining it
    proc = _demo(out, overrides)
    assert proc.returncode == 0 and proc.stdout.count("resumed from") == 3, proc.stdout + proc.stderr
    rows = compare([out / "residual", out / "mhc"], tmp_path / "cmp")["rows"]
    assert rows[0]["val_gap_vs_residual"] == 0.0 and rows[1]["step_time_vs_residual"] > 0
