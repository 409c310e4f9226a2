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


def test_overlapped_pairs_put_forward_and_backward_on_different_streams(tmp_path):
    """The issue order of our OVERLAP_F_B (recorded on CPU, the same logic CUDA runs): each pair's backward runs on the
    stream its micro-batch's forward ran on (autograd's rule), and the pair's forward goes on the other one, so the
    two halves never serialise on one stream."""
    out = tmp_path / "overlap.json"
    cmd = [sys.executable, "scripts/bench_overlap.py", "--steps", "1", "--warmup", "0", "--microbatches", "8"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trace = json.loads(out.read_text())["results"][0]["stream_trace"]
    assert len(trace) >= 4, trace
    forward_stream = {}  # (stage, mb) -> stream; the runtime's own F actions ran on the current stream (0)
    for _, f_stage, f_mb, f_stream, b_stage, b_mb, b_stream in trace:
        assert b_stream == forward_stream.pop((b_stage, b_mb), 0), trace
        assert f_stream != b_stream, trace
        forward_stream[(f_stage, f_mb)] = f_stream
    assert {t[3] for t in trace} == {0, 1}, trace  # both streams carry forwards in steady state
