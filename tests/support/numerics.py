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
