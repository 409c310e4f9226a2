"""The MoE FFN (mhc_train/model/moe.py) against a per-token reference, its grouped matmul against the loop, the
balancing bias update against a hand computation, dropless vs capacity routing, config refusals, and a tiny MoE
trained in all three arms with a bit-exact resume."""

import pytest
import torch
import torch.nn.functional as F

from mhc_train.config import ConfigError, MoEConfig
from mhc_train.model.moe import MoE, experts_grouped, experts_loop
from tests.support.configs import conn_cfg, tiny_model_cfg


def _moe(seed=0, **kw) -> MoE:
    cfg = MoEConfig(**{"n_routed_experts": 4, "top_k": 2, "n_shared_experts": 1, **kw})
    m = MoE(16, cfg, hidden_dim=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.expert_bias.copy_(torch.randn(4, generator=g) * 0.1)
    return m


def _reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its selected experts one by one (the spec, in plain loops)."""
    out = []
    for tok in x.reshape(-1, x.shape[-1]):
        s = torch.sigmoid(tok @ m.gate.weight.T)
        top = torch.topk(s + m.expert_bias, m.top_k).indices
        g = s[top] / s[top].sum() * m.route_scale
        y = m.shared(tok) if m.shared is not None else torch.zeros_like(tok)
        for gi, e in zip(g, top.tolist()):
            w1, w3, w2 = m.experts.w1[e], m.experts.w3[e], m.experts.w2[e]
            y = y + gi * ((F.silu(tok @ w1) * (tok @ w3)) @ w2)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("grouped", [True, False])
def test_moe_matches_the_per_token_reference_values_and_gradients(grouped):
    m = _moe(route_scale=2.5)
    m.experts.grouped = grouped
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = m(x)
    ref = _reference(m, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    ref_grads = torch.autograd.grad(ref, [x, *m.parameters()], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_matmul_equals_the_loop_with_an_empty_expert():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=gen, requires_grad=True)
    w1, w3 = (torch.randn(3, 8, 4, generator=gen, requires_grad=True) for _ in range(2))
    w2 = torch.randn(3, 4, 8, generator=gen, requires_grad=True)
    counts = torch.tensor([4, 0, 5])
    a, b = experts_grouped(x, w1, w3, w2, counts), experts_loop(x, w1, w3, w2, counts)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), [x, w1, w3, w2])
    gb = torch.autograd.grad(b.sum(), [x, w1, w3, w2])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_bias_update_matches_a_hand_computation_and_steers_selection():
    m = _moe(bias_update_rate=0.01)
    m.expert_bias.zero_()
    load = torch.tensor([10.0, 2.0, 5.0, 7.0], dtype=torch.float64)  # mean 6
    stats = torch.cat([load, torch.tensor([0.0, 3.0, 12.0], dtype=torch.float64)])
    m.apply_balance(stats)
    assert m.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, -0.01])
    assert m.load_stats.abs().sum() == 0  # counts reset
    assert m.balance_metrics()["load_max_over_mean"] == pytest.approx(10 / 6)
    # a forward in training mode counts N*k pairs; eval / no_grad forwards count nothing
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        m(x)
    assert m.load_stats.sum() == 0
    m(x)
    assert m.load_stats[:4].sum() == 3 * 4 * 2 and m.load_stats[-1] == 12
    # a large bias forces an expert into every token's top-k (selection only: the gate weights are unchanged)
    m.expert_bias.copy_(torch.tensor([0.0, 100.0, 0.0, 0.0]))
    _, top, _ = m.route(x.view(-1, 16))
    assert (top == 1).any(-1).all()


def test_dropless_never_drops_and_capacity_drops_are_counted():
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(3))
    m = _moe()
    m.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    m(x)
    assert m.load_stats[4] == 0 and m.load_stats[:2].tolist() == [32, 32]
    capped = _moe(capacity_factor=1.0)  # capacity ceil(1 * 32 * 2 / 4) = 16 per expert
    capped.load_state_dict(m.state_dict())
    y = capped(x)
    assert capped.load_stats[4] == 2 * (32 - 16)  # experts 0 and 1 each drop 16 pairs
    # the dropped pairs contribute nothing: the last 16 tokens get only the shared expert
    flat = x.view(-1, 16)
    torch.testing.assert_close(y.view(-1, 16)[16:], capped.shared(flat[16:]))


def test_sequence_aux_loss_adds_its_gradient_and_not_its_value():
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(4))
    plain, aux = _moe(), _moe(seq_aux_loss_coef=0.3)
    y0, y1 = plain(x), aux(x)
    assert torch.equal(y0, y1)  # the returned value is the FFN's alone
    (g0,) = torch.autograd.grad(y0.sum(), plain.gate.weight)
    (g1,) = torch.autograd.grad(y1.sum(), aux.gate.weight)
    scores, top, _ = aux.route(x.view(-1, 16))
    loss = aux.seq_aux_loss(scores, top, 2)  # 0.3 * sum_i f_i P_i, by its formula
    f = torch.zeros(2, 4).scatter_add_(1, top.view(2, -1), torch.ones(2, 12)) * 4 / (2 * 6)
    p = (scores.view(2, 6, 4) / scores.view(2, 6, 4).sum(-1, keepdim=True)).mean(1)
    torch.testing.assert_close(loss, 0.3 * (f * p).sum(-1).mean())
    (ga,) = torch.autograd.grad(loss, aux.gate.weight)
    torch.testing.assert_close(g1 - g0, ga)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(ffn="moe", moe=MoEConfig(n_routed_experts=2, top_k=3)), "top_k"),
        (dict(ffn="sparse"), "model.ffn"),
    ],
)
def test_bad_moe_settings_are_refused_in_one_line(kw, match):
    from mhc_train.model import build_model

    with pytest.raises(ConfigError, match=match) as e:
        build_model(tiny_model_cfg(**kw), conn_cfg("residual"))
    assert "\n" not in str(e.value)


def test_ep_refusals_name_the_fix():
    from mhc_train.config import Config
    from mhc_train.config.validate import validate_ep

    cfg = Config()
    cfg.model.ffn = "moe"
    cfg.model.moe.n_routed_experts = 6
    cfg.parallel.ep = 4
    for engine, match in (("ddp", "engine=fsdp"), ("deepspeed", "deepspeed"), ("fsdp", "must divide")):
        cfg.parallel.engine = engine
        with pytest.raises(ConfigError, match=match) as e:
            validate_ep(cfg, 4)
        assert "\n" not in str(e.value)
    cfg.model.moe.n_routed_experts = 8
    with pytest.raises(ConfigError, match="data-parallel size"):
        validate_ep(cfg, 6)
    validate_ep(cfg, 4)
    validate_ep(cfg, 8)  # ep below the data-parallel size (parallel/expert_layout.py)


def test_dense_models_are_unchanged_by_the_moe_code():
    """model.ffn=dense (the default) builds the same modules and values as before: no MoE, no new buffers."""
    from mhc_train.model import build_model

    model = build_model(tiny_model_cfg(), conn_cfg("mhc"))
    assert [n for n, _ in model.named_buffers()] == ["rope"]
    moe = build_model(tiny_model_cfg(ffn="moe", moe=MoEConfig(n_routed_experts=4, expert_hidden_dim=8)),
                      conn_cfg("mhc"))  # fmt: skip
    assert type(moe.layers["0"].ffn).__name__ == "FeedForward" and isinstance(moe.layers["1"].ffn, MoE)
    shared = {k for k in model.state_dict() if k in moe.state_dict() and not k.startswith("layers.1.ffn")}
    for k in shared:
        assert torch.equal(model.state_dict()[k], moe.state_dict()[k]), k


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_moe_test_preset_trains_in_every_arm(prepared_data, tmp_path, arm):
    from mhc_train.config import load_config
    from mhc_train.train.metrics import read_metrics
    from mhc_train.train.trainer import Trainer
    from tests.support.configs import run_overrides

    over = {"model": "moe_test", "connection": arm, "train.max_steps": 3, "train.diag_every": 3, "train.log_every": 1}
    cfg = load_config(run_overrides(prepared_data, tmp_path / "r", **over))
    trainer = Trainer(cfg)
    trainer.run()
    bias = trainer.model.layers["1"].ffn.expert_bias
    assert bias.abs().max() > 0  # balanced after every step
    moe = read_metrics(tmp_path / "r")["diag"][-1]["moe"]["1"]
    assert moe["dropped"] == 0 and moe["load_max_over_mean"] >= 1 and 0 < moe["router_entropy"] <= 1.3863
    assert moe["bias_absmax"] == pytest.approx(float(bias.abs().max()))


def test_moe_resume_is_bit_exact(prepared_data, tmp_path):
    """6 steps in one go == 3 steps, a checkpoint, 3 more in a new trainer: losses, weights and balancing bias."""
    from mhc_train.config import load_config
    from mhc_train.train.trainer import Trainer
    from tests.support import runs
    from tests.support.configs import run_overrides

    common = {"model": "moe_test", "connection": "mhc", "train.max_steps": 6, "checkpoint.every": 0, "model.moe.bias_update_rate": 0.05,
              "train.log_every": 1}  # fmt: skip
    full = Trainer(load_config(run_overrides(prepared_data, tmp_path / "full", **common)))
    full.run()
    Trainer(load_config(run_overrides(prepared_data, tmp_path / "split", **common, **{"train.stop_at_step": 3}))).run()
    split = Trainer(load_config(run_overrides(prepared_data, tmp_path / "split", **common)))
    assert split.step == 3
    split.run()
    a, b = runs.losses_by_step(tmp_path / "full"), runs.losses_by_step(tmp_path / "split")
    assert a.keys() == b.keys() == set(range(1, 7)) and all(a[s] == b[s] for s in a)
    sa, sb = full.model.state_dict(), split.model.state_dict()
    assert runs.weights(tmp_path / "split", 3)["layers.1.ffn.expert_bias"].abs().max() > 0  # the bias is state
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_flops_count_the_active_experts():
    """An MoE layer's FFN FLOPs: the router and top-k + shared experts of width H, not the dense SwiGLU of width F."""
    import dataclasses

    from mhc_train.train.throughput import flops_per_token

    moe = tiny_model_cfg(ffn="moe", moe=MoEConfig(n_routed_experts=8, top_k=2, n_shared_experts=1, expert_hidden_dim=8))
    dense = dataclasses.replace(moe, ffn="dense")
    F_, C = 96, 32  # the test shape's dense width (2/3 * 4 * 32 rounded up to 32) and dim
    per_layer = C * 8 + 3 * C * 8 * (2 + 1) - 3 * C * F_
    got = flops_per_token(moe, conn_cfg("mhc"), 16)["dense"] - flops_per_token(dense, conn_cfg("mhc"), 16)["dense"]
    assert got == 6 * per_layer  # one MoE layer (first_k_dense=1 of 2), x2 FLOPs per MAC, x3 for training


def test_aux_loss_weighs_alike_under_gradient_accumulation():
    """The engine divides the LM loss by grad_accum; the auxiliary loss's gradient must be divided alike, or
    grad_accum = k multiplies seq_aux_loss_coef by k: two micro-batches of 2 give one batch of 4's gradients."""
    from mhc_train.model import build_model
    from mhc_train.parallel.dist import DistInfo
    from mhc_train.parallel.engine import LocalEngine

    moe = MoEConfig(n_routed_experts=4, top_k=2, first_k_dense=0, seq_aux_loss_coef=0.5, expert_hidden_dim=16)
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(3))

    def grads(accum):
        model = build_model(tiny_model_cfg(ffn="moe", moe=moe), conn_cfg("mhc"), seed=0)
        engine = LocalEngine(model, None, None, DistInfo(), torch.device("cpu"), 1.0, None, accum)
        rows = 4 // accum
        engine.forward_backward(
            lambda m, *_: (tokens[m * rows : (m + 1) * rows, :-1], tokens[m * rows : (m + 1) * rows, 1:])
        )
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    one, two = grads(1), grads(2)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
