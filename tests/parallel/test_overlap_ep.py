"""Fast checks (one process, no process group) of the pieces PP x EP rests on; the 4-rank numerics and the trace of
real all-to-alls are in test_pipeline_ep.py.

- `overlap_ep.Interleave`: the two halves of an overlapped pair alternate at their exchanges, each exchange waited only
  after the other half ran its next chunk, with fake work handles standing in for async all-to-alls; an error in
  either half reaches the caller.
- A pipeline counts each token once for the MoE balancing load: torch's stage runs an extra forward on the first step
  to infer its tensors' metadata, whose tokens must not count (`pipeline.keep_moe_counts_through_inference`).
"""

from __future__ import annotations

import pytest
import torch

from mhc_train.parallel.overlap_ep import Interleave, hidden_all_to_alls


class _Work:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(f"wait {self.name}")


def _half(il: Interleave, log: list, name: str, chunks: int):
    def run():
        for i in range(chunks):
            log.append(f"{name} compute {i}")
            if i < chunks - 1:
                il.hide(_Work(log, f"{name}{i}"), f"x{i}")

    return run


def test_interleave_hides_each_exchange_behind_the_other_half():
    log, events = [], []
    il = Interleave(1, {"F": (0, 1), "B": (3, 0)}, events)
    il.run(_half(il, log, "F", 5), _half(il, log, "B", 3))
    assert log == [
        "F compute 0",  # F posts x0 ...
        "B compute 0",  # ... B computes meanwhile, posts its x0
        "wait F0",
        "F compute 1",
        "wait B0",
        "B compute 1",
        "wait F1",
        "F compute 2",
        "wait B1",
        "B compute 2",  # B ends
        "wait F2",
        "F compute 3",  # F's last exchange has nothing left to hide behind: waited at once
        "wait F3",
        "F compute 4",
    ], log
    assert hidden_all_to_alls(events) == (5, 6), events
    posts = [(e[1], e[3], e[4], e[5]) for e in events if e[0] == "POST"]
    assert posts[:2] == [("F", 0, 1, "x0"), ("B", 3, 0, "x0")], posts


def test_interleave_reraises_an_error_of_either_half():
    for failing in ("F", "B"):
        il = Interleave(1, {"F": (0, 0), "B": (1, 0)}, [])

        def bad(failing=failing):
            raise RuntimeError(f"{failing} failed")

        halves = {"F": _half(il, [], "F", 3), "B": _half(il, [], "B", 3), failing: bad}
        with pytest.raises(RuntimeError, match=f"{failing} failed"):
            il.run(halves["F"], halves["B"])


def test_after_one_half_fails_the_other_posts_no_more_exchanges():
    """An exchange posted out of the peers' order would pair with another one of theirs (NCCL matches by issue order):
    once the forward has failed, the backward stops at its next post (`before_post`, which `dist` calls first)."""
    from mhc_train.parallel import dist

    posted = []

    def backward():
        for i in range(3):
            il.before_post()  # what dist._exchange does before posting
            posted.append(i)
            il.hide(_Work([], f"B{i}"), f"x{i}")

    def forward():
        raise RuntimeError("F failed")

    il = Interleave(1, {"F": (0, 0), "B": (1, 0)}, [])
    with pytest.raises(RuntimeError, match="F failed"):
        il.run(forward, backward)
    assert posted == [] and isinstance(il.errors["B"], RuntimeError), (posted, il.errors)
    assert dist._A2A_WAITER is None  # the waiter is uninstalled after the pair


def test_pipeline_counts_each_token_once_for_the_balancing_load():
    import dataclasses

    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.model.moe import moe_modules
    from mhc_train.parallel.build import build_pipeline
    from mhc_train.parallel.dist import DistInfo

    cfg = load_config(["model=moe_test", "train=test", "train.precision=fp32", "train.device=cpu", "model.n_layer=2"])
    parallel = dataclasses.replace(cfg.parallel, pp_schedule="1f1b", pp_microbatches=2, recompute="none")
    cfg = dataclasses.replace(cfg, parallel=parallel)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # a one-rank group (torch's stages need one), torn down before the next test
        engine = build_pipeline(build_model(cfg.model, cfg.connection, seed=0, device="meta"), cfg, DistInfo(), pp=1)
        tokens = torch.randint(0, cfg.model.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
        engine.forward_backward(lambda micro, shard, n: (tokens[:, :-1], tokens[:, 1:]))
    finally:
        torch.distributed.destroy_process_group()
    layers = [m for mod in engine.live_modules() for _, m in moe_modules(mod)]
    assert layers
    for m in layers:  # E counts, dropped, entropy sum, tokens: k selections per token
        assert m.load_stats[-1] == 4 * 8 and m.load_stats[: m.n_experts].sum() == 4 * 8 * m.top_k, m.load_stats
