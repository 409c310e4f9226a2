"""`train.compile` through `build_engine`: every block (or, under a recompute runner, every block's F) is compiled in
place, and a compiled step equals the eager one, for one process (DDP compiles the same plain model) and FSDP2 (world 1, an in-process gloo group)
and a pipeline's stages (pp = 1, both V stages on one device). The compile backend is `aot_eager` here (Inductor's
C++ build would cost minutes on this CPU); it traces the same graphs, so a graph break or a wrong graph shows.
Each case failed before per-block compilation: the engines compiled the whole forward (no compiled block)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from mhc_train.config import load_config
from mhc_train.model import build_model
from mhc_train.parallel import DistInfo, build_engine, builds_on_meta
from mhc_train.parallel import build as build_mod
from mhc_train.parallel.build import build_pipeline
from mhc_train.parallel.compile import apply_compile

BASE = ["model=test", "train=test", "model.n_layer=2", "model.dim=32", "model.vocab_size=64", "train.batch_size=4",
        "train.seq_len=8", "connection=mhc", "train.grad_accum=1"]  # fmt: skip
CASES = {
    "none": ["parallel.engine=none"],
    "none-recompute": ["parallel.engine=none", "parallel.recompute=mhc"],
    "none-recompute-full": ["parallel.engine=none", "parallel.recompute=full"],
    "fsdp": ["parallel.engine=fsdp"],
    "fsdp-recompute": ["parallel.engine=fsdp", "parallel.recompute=full"],
}


@pytest.fixture
def one_rank():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield DistInfo(rank=0, world=1)
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(build_mod, "compile_blocks", functools.partial(apply_compile, backend="aot_eager"))
    for mod in ("mhc_train.parallel.fsdp", "mhc_train.parallel.data_parallel"):
        monkeypatch.setattr(f"{mod}.compile_blocks", functools.partial(apply_compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 8), generator=g)
    y = torch.randint(0, 64, (4, 8), generator=g)
    return lambda micro, shard, n: (x[shard * 4 // n : (shard + 1) * 4 // n], y[shard * 4 // n : (shard + 1) * 4 // n])


def _step(overrides, info, compile_):
    cfg = load_config([*BASE, *overrides, f"train.compile={str(compile_).lower()}"])
    model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if builds_on_meta(cfg) else "cpu")
    engine = build_pipeline(model, cfg, info, pp=1) if cfg.parallel.pp > 1 else build_engine(model, cfg, info)
    loss = engine.forward_backward(_batch())
    grads = {n: p.grad.detach().clone() for p, n in engine.param_names().items() if p.grad is not None}
    grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
    return engine, float(loss), grads


def _compiled_regions(engine) -> int:
    return sum(
        getattr(m, "_compiled_call_impl", None) is not None for mod in engine.live_modules() for m in mod.modules()
    )


@pytest.mark.slow  # compiling costs 2-10 s per case here: out of `make test-fast`
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_compiled_step_equals_eager_on_every_engine(case, one_rank):
    eager, loss_e, grads_e = _step(CASES[case], one_rank, False)
    compiled, loss_c, grads_c = _step(CASES[case], one_rank, True)
    assert _compiled_regions(eager) == 0
    per_layer = 2 if "recompute" in case else 1  # attn and ffn under a recompute runner, else the block
    assert _compiled_regions(compiled) == 2 * per_layer, case
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e), (loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_a_compiled_pipeline_equals_eager(one_rank):
    pp = ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.recompute=none", "train.batch_size=4"]
    eager, loss_e, grads_e = _step(pp, one_rank, False)
    compiled, loss_c, grads_c = _step(pp, one_rank, True)
    assert _compiled_regions(compiled) == 2 and _compiled_regions(eager) == 0
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e), (loss_c, loss_e)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
