"""The traffic audit (scripts/bench_kernels.py --audit) counts what a site moves, on `meta` tensors (no kernel runs)."""

import torch

from scripts.bench_kernels import traffic_audit


def test_audit_counts_each_launch_from_its_arguments_and_the_forward_meets_the_goal():
    n, C, tokens = 4, 256, 64
    audit = traffic_audit("mhc", n=n, C=C, dtype=torch.bfloat16, tokens=tokens)
    fwd = audit["forward"]
    names = [row["kernel"] for row in fwd["kernels"]]
    assert names == ["_projection_fwd_kernel", "_gates_fwd_kernel", "_mhc_pre_fwd_kernel", "_mhc_post_res_fwd_kernel"]
    pre = fwd["kernels"][2]
    assert pre["read_B_per_token"] == n * C * 2 + n * 4 and pre["written_B_per_token"] == C * 2  # x, h_pre -> F_in
    assert fwd["minimum_read_B_per_token"] == (3 * n + 1) * C * 2
    assert fwd["ratio_to_minimum"] <= 1.25, fwd["ratio_to_minimum"]


def test_audit_sees_the_torch_ops_between_kernels_and_mhc_writes_one_dx():
    """mHC's site chains x through its ops: no torch op touches a stream-sized tensor in its backward (autograd adds no
    dx). HC's coefficients are torch ops over the streams: the audit lists them rather than hiding them."""
    n, C = 2, 64
    stream_bytes = n * C * 2  # bf16 [n, C] per token

    def big_torch_ops(arm):
        rows = traffic_audit(arm, n=n, C=C, tokens=32)["backward"]["kernels"]
        return [r for r in rows if r["kernel"].startswith("aten.") and r["written_B_per_token"] >= stream_bytes]

    assert big_torch_ops("mhc") == []
    assert any(r["kernel"] == "aten.add" for r in big_torch_ops("hc"))
