"""Measurement helpers shared by the benchmark scripts: step time and bytes saved for backward.

Bytes saved for backward are counted with `torch.autograd.graph.saved_tensors_hooks` (works on CPU and on the meta
device): every tensor autograd keeps is recorded once per storage; parameters are excluded (they exist anyway).
"""

from __future__ import annotations

import statistics
import time

import torch

from mhc_train.model import lm_loss


def saved_bytes_for_backward(fn, params=()) -> int:
    """Bytes of distinct storages autograd saves while running `fn()` (parameter storages excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "meta":
            key, nbytes = id(t), t.numel() * t.element_size()
        else:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        if key not in param_ptrs:
            seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """The LM loss of `model` on tokens [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:])."""
    return lm_loss(model(tokens[:, :-1]), tokens[:, 1:])


def time_fwd_bwd(model, tokens: torch.Tensor, warmup: int = 2, iters: int = 5) -> dict:
    """Median / p20 / p80 seconds of one forward+backward of the LM loss."""
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        next_token_loss(model, tokens).backward()
        if tokens.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[-1]}
