"""Tensor-parallel checks run under `torchrun --nproc_per_node=2` (gloo) by test_tensor_parallel.py: each rank builds
the plain model and its TP=2 copy from the same seed, so the one-process reference runs on every rank beside it.

    python -m torch.distributed.run --nproc_per_node=2 tests/parallel/tp_checks.py <case> [<case> ...]

Cases: `arm:backend:recompute` (e.g. mhc:torch:none): 3 SGD steps, loss for loss and gradient for gradient;
`spy` (no rank materialises [B, T, V] logits; the loss equals the gathered loss); `saved` (per-rank saved bytes of the
stream state are 1/tp of tp=1's); `compile` (a per-block compiled TP copy, aot_eager, equals the eager one process for
2 steps). Prints `PASS <case>` per case; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from mhc_train.config import ConnectionConfig, ModelConfig
from mhc_train.model import transformer
from mhc_train.model.transformer import build_model
from mhc_train.parallel.compile import apply_compile
from mhc_train.parallel.recompute import apply_recompute
from mhc_train.parallel.state import full
from mhc_train.parallel.tensor_parallel import VocabParallelLoss, apply_tp, gather_tokens, sum_site_grads

B, T, V, C = 2, 16, 64, 32
TOL = 2e-5


def build(arm: str, backend: str = "torch"):
    cfg = ModelConfig(vocab_size=V, dim=C, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=T)
    extra = {"n_streams": 1} if arm == "residual" else {"phi_init_std": 0.5} if arm == "mhc" else {}
    return build_model(cfg, ConnectionConfig(type=arm, backend=backend, **extra), seed=0)


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def check_steps(mesh, arm: str, backend: str, recompute: str, steps: int = 3, compiled: bool = False) -> None:
    ref = build(arm, backend)
    tp = apply_tp(copy.deepcopy(ref), mesh)
    for m in (ref, tp):
        apply_recompute(m, recompute)
    if compiled:  # train.compile's per-block regions on the TP copy (aot_eager: Inductor's C++ build costs minutes)
        apply_compile(tp, backend="aot_eager")
        assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in tp.modules()) == 2
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, tp)]
    for step in range(steps):
        x, y = batch(step)
        a, b = ref(x, y), tp(x, y)
        a.backward(), b.backward()
        sum_site_grads(tp, mesh)
        assert abs(a.item() - b.item()) <= TOL * abs(a.item()), (step, a.item(), b.item())
        for (name, p), q in zip(ref.named_parameters(), tp.parameters()):
            diff = (p.grad - full(q.grad)).abs().max().item()
            assert diff <= TOL * max(1.0, p.grad.abs().max().item()), (step, name, diff)
        for o in opts:
            o.step(), o.zero_grad()


class ShapeSpy(TorchDispatchMode):
    """Every op output's (local) shape during a forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(getattr(t, "_local_tensor", t).shape))
        return out


def full_logits(shapes) -> bool:
    return any(s and s[-1] == V and torch.Size(s).numel() >= B * T * V for s in shapes)


def check_spy(mesh) -> None:
    ref = build("mhc")
    tp = apply_tp(copy.deepcopy(ref), mesh)
    x, y = batch(0)
    with ShapeSpy() as seen_ref:
        ref(x, y).backward()
    assert full_logits(seen_ref.shapes), "the spy must see the one-process [B, T, V] logits"
    with ShapeSpy() as seen:
        tp(x, y).backward()
    assert not full_logits(seen.shapes), [s for s in seen.shapes if s and s[-1] == V]
    # the vocab-parallel loss equals the loss on the gathered logits, for an arbitrary hidden slice
    h = torch.randn(B, T // mesh.size(), C, generator=torch.Generator().manual_seed(dist.get_rank()))
    h.requires_grad_()
    got = VocabParallelLoss(mesh)(h, tp.output, y)
    logits = gather_tokens(h, mesh) @ full(tp.output.weight).T  # [B, T, V], for the comparison only
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert abs(got.item() - want.item()) <= 1e-5 * want.item(), (got.item(), want.item())
    (grad,) = torch.autograd.grad(got, h)
    # split into chunks of 8 tokens (each chunk's logits recomputed in backward): the same loss and gradient
    saved, transformer.LOSS_CHUNK_ELEMENTS = transformer.LOSS_CHUNK_ELEMENTS, 8 * V // mesh.size()
    try:
        chunked = VocabParallelLoss(mesh)(h, tp.output, y)
        (chunked_grad,) = torch.autograd.grad(chunked, h)
    finally:
        transformer.LOSS_CHUNK_ELEMENTS = saved
    assert abs(chunked.item() - got.item()) <= 1e-6 * got.item(), (chunked.item(), got.item())
    assert (chunked_grad - grad).abs().max().item() <= 1e-6, (chunked_grad - grad).abs().max().item()


def stream_bytes(model, n: int, tokens: int) -> int:
    """Bytes of the tensors autograd saves in one forward that hold a stream state of `tokens` tokens ([..., n, C] or
    [..., n*C] with tokens x n x C elements: the sites' inputs, whatever view the backend keeps)."""
    total = 0

    def pack(t):
        nonlocal total
        local = getattr(t, "_local_tensor", t)
        stream = local.ndim >= 2 and (tuple(local.shape[-2:]) == (n, C) or local.shape[-1] == n * C)
        if stream and local.numel() == tokens * n * C:
            total += local.numel() * local.element_size()
        return t

    x, y = batch(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y).backward()
    return total


def check_saved(mesh) -> None:
    ref = build("mhc")
    tp = apply_tp(copy.deepcopy(ref), mesh)
    one, per_rank = stream_bytes(ref, 4, B * T), stream_bytes(tp, 4, B * T // mesh.size())
    assert one > 0 and per_rank * mesh.size() == one, (one, per_rank)


def main(cases) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for case in cases:
        if case == "spy":
            check_spy(mesh)
        elif case == "saved":
            check_saved(mesh)
        elif case == "compile":
            check_steps(mesh, "mhc", "torch", "none", steps=2, compiled=True)
        else:
            arm, backend, recompute = case.split(":")
            check_steps(mesh, arm, backend, recompute, steps=1 if backend == "triton" else 3)
        if dist.get_rank() == 0:
            print(f"PASS {case}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
