"""Our OVERLAP_F_B handler in one process: DualPipeV folded onto one rank (two stages) emits overlapped F/B pairs;
with our handler, with torch's in-order handler and under 1F1B, the first step's loss and gradient norm agree
exactly on CPU (where the handler runs the pair in order). One run of the bench serves every test here."""

import json
import sys

import pytest

from tests.support import launch

pytestmark = pytest.mark.slow  # a subprocess (scripts/bench_overlap.py)


@pytest.fixture(scope="module")
def overlap_report(tmp_path_factory):
    """One run of scripts/bench_overlap.py shared by the tests below: one step, 8 micro-batches, recompute=mhc (the
    three variants, our handler's stream trace)."""
    out = tmp_path_factory.mktemp("overlap") / "overlap.json"
    cmd = ["scripts/bench_overlap.py", "--steps", "1", "--warmup", "0", "--recompute", "mhc", "--microbatches", "8"]
    launch.run([sys.executable, *cmd, "--out", str(out)], timeout=300)
    return json.loads(out.read_text())


def test_bench_overlap_runs_and_the_three_variants_agree(overlap_report):
    ours, torch_in_order, one_f_one_b = overlap_report["results"]
    assert ours["our_overlap"] and ours["overlap_pairs_per_step"] > 0
    assert torch_in_order["overlap_pairs_per_step"] == 0
    for other in (torch_in_order, one_f_one_b):
        assert other["first_loss"] == ours["first_loss"]
        assert abs(other["first_grad_norm"] - ours["first_grad_norm"]) <= 1e-6 * ours["first_grad_norm"]


def test_overlapped_pairs_put_forward_and_backward_on_different_streams(overlap_report):
    """The issue order of our OVERLAP_F_B (recorded on CPU, the same logic CUDA runs): each pair's backward runs on the
    stream its micro-batch's forward ran on (autograd's rule), and the pair's forward goes on the other one, so the
    two halves never serialise on one stream."""
    trace = overlap_report["results"][0]["stream_trace"]
    assert len(trace) >= 4, trace
    forward_stream = {}  # (stage, mb) -> stream; the runtime's own F actions ran on the current stream (0)
    for _, f_stage, f_mb, f_stream, b_stage, b_mb, b_stream in trace:
        assert b_stream == forward_stream.pop((b_stage, b_mb), 0), trace
        assert f_stream != b_stream, trace
        forward_stream[(f_stage, f_mb)] = f_stream
    assert {t[3] for t in trace} == {0, 1}, trace  # both streams carry forwards in steady state
