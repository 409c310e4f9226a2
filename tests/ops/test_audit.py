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


def test_a_linked_site_writes_one_dx_and_no_torch_op_touches_the_streams():
    """mHC's and dynamic HC's sites link their ops (mhc_kernels/link.py): in the backward, only the projection's kernel
    writes a stream-sized tensor (x's one gradient), pre and post_res write none, and no torch op (autograd's sums,
    casts, HC's gates) reads or writes one."""
    n, C, tokens = 2, 64, 4096  # meta tensors: many tokens cost nothing and amortise the weight-sized ops
    stream_bytes = n * C * 2  # bf16 [n, C] per token
    for arm in ("mhc", "hc"):
        rows = traffic_audit(arm, n=n, C=C, tokens=tokens)["backward"]["kernels"]
        writers = [r["kernel"] for r in rows if r["written_B_per_token"] >= stream_bytes]
        assert writers == ["_projection_bwd_kernel"], (arm, writers)
        big_torch = [r for r in rows if r["kernel"].startswith("aten.") and r["read_B_per_token"] >= stream_bytes]
        assert big_torch == [], (arm, big_torch)
        post_res = next(r for r in rows if r["kernel"] == "_mhc_post_res_bwd_kernel")
        assert post_res["written_B_per_token"] < n * C * 2 / 2 + 64, post_res  # dy (C) and the coefficient grads


def test_the_gpu_benchmark_runs_every_kernel_of_a_linked_site():
    """`bench_kernels.py` times each kernel alone on a GPU; run its rows here under the interpreter on a tiny shape, so
    a launcher signature change cannot break the GPU benchmark unseen."""
    from scripts.bench_kernels import kernel_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the kernels compile for real
    rows = kernel_rows(1, 16, 32, 4, device, 1e9, torch.float32, iters=1)
    assert set(rows) == {
        "pre_fwd",
        "pre_bwd",
        "post_res_fwd",
        "post_res_bwd",
        "projection_fwd",
        "projection_bwd",
        "sinkhorn_fwd",
        "sinkhorn_bwd",
    }
    assert all(row["ms"] > 0 and row["GB_s"] > 0 for row in rows.values()), rows
