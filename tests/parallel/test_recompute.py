"""Selective recomputation: bit-exact gradients, split input/weight backward, and a memory model that is measured."""

import pytest
import torch

from mhc_train.model import build_model
from mhc_train.parallel import apply_recompute, optimal_block, plan_blocks
from tests.support.configs import conn_cfg, tiny_model_cfg
from tools.measure import next_token_loss, saved_bytes_for_backward
from tools.memory_model import component_bytes, predict_bytes_per_token

ARMS = ["residual", "hc", "mhc", "mhc_identity"]


def _model(arm, n_layer=4, backend="torch", **kw):
    conn = conn_cfg(arm, backend=backend, **({"t_max": 4} if backend == "triton" else {}))  # 4: the interpreter
    model = build_model(tiny_model_cfg(n_layer=n_layer, **kw), conn, seed=0)
    with torch.no_grad():  # away from init so every connection term is live
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "_conn." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _grads(model, tokens):
    model.zero_grad(set_to_none=True)
    loss = next_token_loss(model, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "arm,backend",
    [
        *((a, "torch") for a in ARMS),
        # the Triton interpreter: 7-13 s per case on 2 cores
        *(pytest.param(a, "triton", marks=pytest.mark.slow) for a in ("hc", "mhc")),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("mode", ["mhc", "full"])
def test_recompute_gradients_are_bit_identical(arm, backend, mode):
    """On the kernels too: the replayed site is linked like the plain one (one dx per site, the same sums)."""
    model = _model(arm, backend=backend)  # 8 sites
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    ref_loss, ref = _grads(model, tokens)
    for block in (1, 3, 5, "auto") if backend == "torch" else (3,):  # 3 and 5 do not divide 8 sites
        apply_recompute(model, mode, block)
        loss, got = _grads(model, tokens)
        assert torch.equal(loss, ref_loss)
        for name in ref:
            diff = (got[name] - ref[name]).abs().max().item()
            assert torch.equal(got[name], ref[name]), f"{mode} L_r={block}: {name} differs by {diff:.3e}"
    apply_recompute(model, "none")
    assert model.block_runner is None


@pytest.mark.parametrize("arm", ["hc", "mhc"])
def test_split_input_then_weight_backward(arm):
    """Zero-bubble schedules ask for input gradients first, weight gradients later: both must match one backward."""
    model = _model(arm)
    apply_recompute(model, "mhc", 3)
    x = model.conn.expand(model.tok_embeddings(torch.randint(0, 256, (2, 16)))).detach().requires_grad_()
    params = [p for n, p in model.named_parameters() if n.startswith("layers.")]
    w = torch.randn(2, 16, model.n_streams, 32)

    def stage():  # a pipeline stage: stream state in, stream state out
        return model.run_blocks(x)

    (gx_ref, *gp_ref) = torch.autograd.grad((stage() * w).sum(), [x, *params])
    out = (stage() * w).sum()
    (gx,) = torch.autograd.grad(out, [x], retain_graph=True)
    gp = torch.autograd.grad(out, params)
    assert torch.equal(gx, gx_ref)
    assert all(torch.equal(a, b) for a, b in zip(gp, gp_ref))


@pytest.mark.parametrize("arm", ["hc", "mhc"])
@pytest.mark.parametrize("mode", ["mhc", "full"])
def test_torch_split_backward_gives_the_plain_gradients_and_splits_the_work(arm, mode, monkeypatch):
    """torch's own zero-bubble backward (stage_backward_input, then stage_backward_weight from the saved
    intermediates, as ZBV and DualPipeV run it) on a recomputing stage equals the plain stage bit for bit; the input
    call computes no parameter gradient and the weight call no input gradient."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from mhc_train.parallel import recompute

    model = _model(arm)
    x_in = model.conn.expand(model.tok_embeddings(torch.randint(0, 256, (2, 16)))).detach()
    params = [p for n, p in model.named_parameters() if n.startswith("layers.")]
    w = torch.randn(2, 16, model.n_streams, 32)

    x = x_in.clone().requires_grad_()
    h = x
    for layer in model.layers.values():
        h = layer(h, model.rope)
    gx_ref, *gp_ref = torch.autograd.grad(h, [x, *params], w)

    apply_recompute(model, mode, 3)
    calls = []
    real = recompute._grads
    monkeypatch.setattr(
        recompute, "_grads", lambda o, i, g, needed: calls.append(list(needed)) or real(o, i, g, needed)
    )
    for p in params:
        p.grad = None
    x = x_in.clone().requires_grad_()
    out = model.run_blocks(x)
    (gx,), groups = stage_backward_input([out], [w], [x], iter(params))
    input_calls, calls[:] = list(calls), []
    stage_backward_weight(iter(params), groups)
    weight_calls = calls

    assert torch.equal(gx, gx_ref)
    names = [n for n, _ in model.named_parameters() if n.startswith("layers.")]
    for name, p, ref in zip(names, params, gp_ref):
        assert torch.equal(p.grad, ref), f"{name} differs by {(p.grad - ref).abs().max():.3e}"
    assert input_calls and all(c[0] and not any(c[1:]) for c in input_calls), input_calls
    assert weight_calls and all(not c[0] and any(c[1:]) for c in weight_calls), weight_calls


def test_plan_blocks_respects_stages_and_auto():
    assert plan_blocks(8, 4, 3) == [(0, 3), (3, 6), (6, 8)]
    assert plan_blocks(8, 4, 2, stage_sites=[3, 5]) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8)]
    # auto minimises n*ceil(L/L_r) + (n+2)*L_r; near sqrt(nL/(n+2)) = 5.66 for n=4, L=48
    assert optimal_block(4, 48) == 6
    costs = {r: 4 * -(-48 // r) + 6 * r for r in range(1, 49)}
    assert costs[6] == min(costs.values())
    assert all(stop - start <= 6 for start, stop in plan_blocks(48, 4, "auto", stage_sites=[20, 28]))
    plan = plan_blocks(48, 4, "auto", stage_sites=[20, 28])
    assert (16, 20) in plan and (20, 24) in plan  # L_r = 4 in both stages (20 and 28 sites); none crosses 20
    assert not any(start < 20 < stop for start, stop in plan)
    assert plan_blocks(48, 4, "stage", stage_sites=[20, 28]) == [(0, 20), (20, 48)]  # the paper: a stage per block
    with pytest.raises(ValueError, match="positive number of sites, auto or stage"):
        plan_blocks(8, 4, 0)


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_saved_bytes_match_the_memory_model(arm):
    model = _model(arm, n_layer=4, dim=64, vocab_size=64)  # width large next to the vocab: connection terms matter
    B, T = 2, 32
    tokens = torch.randint(0, 64, (B, T + 1), generator=torch.Generator().manual_seed(3))
    comp = component_bytes(model, batch=B, seq_len=T)
    n, C = model.n_streams, 64
    results = {}
    for mode, block in [("none", "auto"), ("mhc", 1), ("mhc", 3), ("mhc", "auto"), ("full", 1), ("full", 3)]:
        plan = apply_recompute(model, mode, block)
        measured = saved_bytes_for_backward(
            lambda: next_token_loss(model, tokens), [*model.parameters(), *model.buffers()]
        )
        measured /= B * T
        effective = "none" if (mode == "mhc" and arm == "residual") else mode
        predicted = predict_bytes_per_token(comp, 4, n, C, effective, plan)["total"]
        results[(mode, block)] = measured
        print(f"{arm} {mode} L_r={block}: measured {measured:,.0f} B/token, predicted {predicted:,.0f}")
        assert abs(measured - predicted) <= 0.10 * predicted, (mode, block, measured, predicted)
    apply_recompute(model, "none")
    if arm != "residual":
        assert results[("mhc", "auto")] < results[("none", "auto")]
    assert results[("full", 3)] < results[("none", "auto")]


def test_trainer_with_recompute_gives_the_same_losses(prepared_data, tmp_path):
    from mhc_train.config import load_config
    from mhc_train.train.metrics import read_metrics
    from mhc_train.train.trainer import Trainer
    from tests.support.configs import run_overrides

    losses = {}
    for mode in ("none", "mhc", "full"):
        run = tmp_path / mode
        cfg = load_config(
            run_overrides(
                prepared_data, run, **{"train.max_steps": 4, "parallel.recompute": mode, "parallel.recompute_block": 3}
            )
        )
        Trainer(cfg).run()
        losses[mode] = [r["loss"] for r in read_metrics(run)["train"]]
    assert losses["none"] == losses["mhc"] == losses["full"], losses


@pytest.mark.parametrize("mode", ["mhc", "full"])
def test_recompute_under_bf16_autocast_replays_in_bf16(mode):
    """The trainer runs forward under autocast and backward outside it: a replay in backward must restore the
    forward's autocast state, or F is recomputed in fp32 (gradients of another function than the forward's, and on
    CUDA the MoE's grouped matmul, which takes bf16 only, fails)."""
    model = _model("mhc")
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = next_token_loss(model, tokens)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    apply_recompute(model, mode, 2)
    loss, got = grads()
    apply_recompute(model, "none")
    assert torch.equal(loss, ref_loss)
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{mode}: {name} differs by {(got[name] - ref[name]).abs().max():.3e}"
