"""Our OVERLAP_F_B handler in one process: DualPipeV folded onto one rank (two stages) emits overlapped F/B pairs;
with our handler, with torch's in-order handler and under 1F1B, the first step's loss and gradient norm agree
exactly on CPU (where the handler runs the pair in order)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_overlap_runs_and_the_three_variants_agree(tmp_path):
    out = tmp_path / "overlap.json"
    cmd = [sys.executable, "scripts/bench_overlap.py", "--steps", "1", "--warmup", "0", "--recompute", "mhc"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ours, torch_in_order, one_f_one_b = report["results"]
    assert ours["our_overlap"] and ours["overlap_pairs_per_step"] > 0
    assert torch_in_order["overlap_pairs_per_step"] == 0
    for other in (torch_in_order, one_f_one_b):
        assert other["first_loss"] == ours["first_loss"]
        assert abs(other["first_grad_norm"] - ours["first_grad_norm"]) <= 1e-6 * ours["first_grad_norm"]
