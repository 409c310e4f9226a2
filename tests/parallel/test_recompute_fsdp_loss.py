"""Chunked cross-entropy (issue 24, item 5): the loss of every engine's forward is computed chunk by chunk over the
tokens, each chunk's logits recomputed in backward, so no full fp32 [B*T, V] logits tensor is held; a batch that
fits one chunk (every test model) gives today's bits."""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import load_config
from mhc_train.model import build_model, chunked_lm_loss, lm_loss

B, T = 2, 32


def _model_and_batch():
    cfg = load_config(["model=test", "train=test", "connection=mhc"])
    model = build_model(cfg.model, cfg.connection, seed=0)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(3))
    return model, tokens[:, :-1], tokens[:, 1:]


def _hidden(model, x):
    return model.norm(model.conn.collapse(model.run_blocks(model.embed(x))))


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("amp", [False, True])
def test_chunked_loss_equals_the_full_loss(amp):
    """11 tokens per chunk (64 tokens: 6 chunks, the last short): loss and every gradient within fp32 rounding of
    lm_loss over the whole logits; bf16 autocast alike (the chunk's GEMM in bf16, its cross-entropy in fp32)."""
    model, x, y = _model_and_batch()
    v = model.output.weight.shape[0]
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        ref, ref_g = _loss_and_grads(model, lambda: lm_loss(model(x), y))
        got, got_g = _loss_and_grads(model, lambda: chunked_lm_loss(_hidden(model, x), model.output, y, 11 * v))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # bf16: the head's weight gradient is one bf16 GEMM per chunk, summed, where the full loss rounds one GEMM
    rtol, atol = (2e-2, 1e-3) if amp else (1e-4, 1e-6)
    for name, g in ref_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=rtol, atol=atol)


def test_no_full_fp32_logits_are_saved_for_backward():
    """Chunked: the largest tensor kept for backward is one chunk's worth (the full loss keeps [B*T, V] in fp32)."""
    model, x, y = _model_and_batch()
    v = model.output.weight.shape[0]
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_lm_loss(_hidden(model, x), model.output, y, 8 * v)
    loss.backward()
    assert max(sizes) < B * T * v // 2, (max(sizes), B * T * v)  # 8192: a stream state [B, T, n, C]


def test_model_loss_keeps_todays_bits_where_one_chunk_holds_the_batch():
    """`model(x, y)`, what every engine now calls, equals lm_loss(model(x), y) bit for bit at the test shapes (the
    golden per-step losses stay as they are), in fp32 and under bf16 autocast."""
    model, x, y = _model_and_batch()
    for amp in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            ref, ref_g = _loss_and_grads(model, lambda: lm_loss(model(x), y))
            got, got_g = _loss_and_grads(model, lambda: model(x, y))
        assert torch.equal(got, ref)
        assert all(torch.equal(got_g[n], g) for n, g in ref_g.items())


@pytest.fixture
def one_rank():
    import torch.distributed as dist

    from mhc_train.parallel import DistInfo

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistInfo(rank=0, world=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["none", "fsdp"])
def test_a_split_loss_through_an_engine_equals_the_whole_one(engine, one_rank, monkeypatch):
    """At test sizes the loss never splits; forced into 7-token chunks (10 of them), a step through the engine (FSDP2's
    root unit holds the head: each chunk's recompute in backward needs its gathered weight) gives the same loss and
    gradients as the one-chunk loss."""
    import mhc_train.model.transformer as tr
    from mhc_train.parallel import build_engine, builds_on_meta

    cfg = load_config(["model=test", "train=test", "connection=mhc", "train.batch_size=2", f"parallel.engine={engine}"])
    x, y = _model_and_batch()[1:]

    def step():
        model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if builds_on_meta(cfg) else "cpu")
        eng = build_engine(model, cfg, one_rank)
        loss = eng.forward_backward(lambda micro, shard, n: (x, y))
        grads = {n: p.grad.detach().clone() for p, n in eng.param_names().items() if p.grad is not None}
        return float(loss), {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}

    whole = step()
    monkeypatch.setattr(tr, "LOSS_CHUNK_ELEMENTS", 7 * cfg.model.vocab_size)
    calls, ce_sum = [], tr._ce_sum
    monkeypatch.setattr(tr, "_ce_sum", lambda *a: calls.append(1) or ce_sum(*a))
    split = step()
    assert len(calls) == 2 * 10, len(calls)  # 64 tokens in 10 chunks, each run forward and recomputed in backward
    assert abs(split[0] - whole[0]) <= 1e-6 * whole[0], (split[0], whole[0])
    assert split[1].keys() == whole[1].keys() and whole[1]
    for n in whole[1]:
        torch.testing.assert_close(split[1][n], whole[1][n], rtol=1e-5, atol=1e-7, msg=n)
