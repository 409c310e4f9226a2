"""Numeric asserts: tensors close with the max abs / relative difference in the message, and two runs equal loss for
loss, gradient for gradient (step 1, as dumped by train.dump_grads_at=1) and weight for weight."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support import runs


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    """Compare and print max abs diff and relative error on failure."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    rel = max_abs / max(expected.abs().max().item(), 1e-30)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max abs diff {max_abs:.3e}, rel {rel:.3e}"


def assert_close_runs(a, b, step, rtol=1e-5, grads=True):
    """Loss for loss; every gradient of step 1 (reduced over ranks); weights after `step` Adam steps (Adam turns
    float-order noise on near-zero gradients into updates of up to lr, so weights get an lr-sized tolerance)."""
    la, lb = runs.losses(a), runs.losses(b)
    assert len(la) == len(lb) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(la, lb)), (la, lb)
    va, vb = runs.losses(a, "val"), runs.losses(b, "val")  # evaluated by every engine its own way
    assert va and len(va) == len(vb) and all(abs(x - y) <= rtol * abs(y) for x, y in zip(va, vb)), (va, vb)
    if grads:
        ga, gb = (torch.load(Path(d) / "grads_step_1.pt") for d in (a, b))
        assert ga.keys() == gb.keys()
        for k in ga:
            scale = gb[k].abs().max().item()
            assert torch.allclose(ga[k], gb[k], atol=1e-5 * scale + 1e-9), (
                f"grad {k}: {(ga[k] - gb[k]).abs().max():.2e}"
            )
    wa, wb = runs.weights(a, step), runs.weights(b, step)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-4), f"{k}: max diff {(wa[k] - wb[k]).abs().max():.2e}"


def assert_ep_run_matches(arm: str, got, want, bias: str = "layers.1.ffn.expert_bias") -> None:
    """An expert-parallel run (losses, per-step gradient dicts, final state dict) against one process: losses to 1e-5
    relative, every gradient to 1e-4, the balancing bias bit for bit (and moved), the weights to 1e-4 absolute."""
    for a, b in zip(got[0], want[0]):
        assert abs(a - b) < 1e-5 * abs(b), (arm, got[0], want[0])
    for step, (ga, gb) in enumerate(zip(got[1], want[1])):
        assert ga.keys() == gb.keys(), (sorted(ga), sorted(gb))
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=f"{arm} step {step} {k}")
    assert got[2][bias].abs().max() > 0 and torch.equal(got[2][bias], want[2][bias]), (got[2][bias], want[2][bias])
    for k in want[2]:  # Adam turns float-order noise on near-zero gradients into lr-sized steps
        torch.testing.assert_close(got[2][k], want[2][k], rtol=0, atol=1e-4, msg=k)
