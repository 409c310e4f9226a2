"""Multi-head latent attention (`mhc_train/model/mla.py`): against an independent reference (explicit per-head
matmuls, softmax under a causal mask, RoPE as complex rotations, fp64), values and every gradient; the padded-value
SDPA path; construction on the meta device and `init_weights`; the config rules; a tiny MLA model trains in all three
arms through the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from mhc_train.config import ConfigError, MLAConfig, load_config
from mhc_train.model import mla as mla_mod
from mhc_train.model.mla import MLAttention
from mhc_train.model.transformer import Transformer, build_model
from tests.support.configs import conn_cfg, run_overrides, tiny_model_cfg
from tests.support.numerics import assert_close

# id -> (MLA shapes, B, T); T odd, value width unequal to the query/key width
CASES = {
    "qlora0-B2-T13": (MLAConfig(q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5), 2, 13),
    "qlora10-B3-T9": (MLAConfig(q_lora_rank=10, kv_lora_rank=7, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=8), 3, 9),
}  # fmt: skip


def mla_cfg(mla: MLAConfig, **kw):
    return tiny_model_cfg(attention="mla", mla=mla, rope_theta=500.0, **kw)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * weight.double()


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, P]: pair (2i, 2i+1) as the complex number x[2i] + i x[2i+1], times exp(i t theta^(-2i/P))."""
    T, P = x.shape
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, P, 2, dtype=torch.float64) / P)
    z = torch.view_as_complex(x.reshape(T, P // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(z).reshape(T, P)


def mla_reference(attn: MLAttention, x: torch.Tensor, theta: float, eps: float) -> torch.Tensor:
    """DeepSeek-V2's MLA equations, one batch row and one head at a time, in fp64."""
    B, T, _ = x.shape
    H, N, P, V, R = attn.n_head, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    w = {name: p.double() for name, p in attn.named_parameters()}
    xd = x.double()
    if attn.q_lora_rank:
        q = _rms(xd @ w["wq_a.weight"].T, w["q_norm.weight"], eps) @ w["wq_b.weight"].T
    else:
        q = xd @ w["wq.weight"].T
    kv = xd @ w["wkv_a.weight"].T  # [B, T, R + P]
    kvb = _rms(kv[..., :R], w["kv_norm.weight"], eps) @ w["wkv_b.weight"].T  # [B, T, H (N + V)]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    rows = []
    for b in range(B):
        k_pe = _rope(kv[b, :, R:], theta)  # [T, P], one key for every head
        heads = []
        for h in range(H):
            qh = q[b].view(T, H, N + P)[:, h]
            kh = kvb[b].view(T, H, N + V)[:, h]
            scores = (qh[:, :N] @ kh[:, :N].T + _rope(qh[:, N:], theta) @ k_pe.T) / math.sqrt(N + P)
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            heads.append(probs @ kh[:, N:])  # [T, V]
        rows.append(torch.cat(heads, dim=-1) @ w["wo.weight"].T)
    return torch.stack(rows)


def _value_and_grads(fn, attn, x, upstream):
    x = x.clone().requires_grad_()
    attn.zero_grad()
    out = fn(x)
    (out.double() * upstream).sum().backward()
    return out.detach().double(), {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in attn.named_parameters()}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mla_matches_reference(case):
    shapes, B, T = CASES[case]
    cfg = mla_cfg(shapes)
    model = build_model(cfg, conn_cfg("residual"), seed=3)
    attn = model.layers["0"].attn
    with torch.no_grad():  # norm gains off 1, so a gain that were skipped would show
        attn.kv_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, cfg.dim, generator=g)
    upstream = torch.randn(B, T, cfg.dim, generator=g, dtype=torch.float64)
    got, got_g = _value_and_grads(lambda t: attn(t, model.rope), attn, x, upstream)
    want, want_g = _value_and_grads(lambda t: mla_reference(attn, t, cfg.rope_theta, cfg.norm_eps), attn, x, upstream)
    assert_close(got, want, atol=1e-6, rtol=1e-5, what="output")
    assert set(got_g) == set(want_g)
    for name in sorted(got_g):
        assert_close(got_g[name].double(), want_g[name].double(), atol=1e-6, rtol=1e-5, what=f"grad {name}")


def test_padded_values_give_the_same_attention(monkeypatch):
    """The CUDA path (values zero-padded to the query/key width, output sliced back) equals the unpadded one."""
    shapes, B, T = CASES["qlora0-B2-T13"]
    model = build_model(mla_cfg(shapes), conn_cfg("residual"), seed=3)
    attn = model.layers["1"].attn
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(2))
    plain = attn(x, model.rope)
    monkeypatch.setattr(mla_mod, "pad_v", lambda device, qk, v: qk - v)
    padded = attn(x, model.rope)
    assert_close(padded, plain, atol=1e-6, rtol=1e-6, what="padded values")


def test_builds_on_meta_and_initialises_like_a_cpu_build():
    cfg = mla_cfg(CASES["qlora10-B3-T9"][0])
    with torch.device("meta"):
        meta = Transformer(cfg, conn_cfg("mhc"))
    meta.to_empty(device="cpu")
    meta.init_weights(seed=5)
    direct = build_model(cfg, conn_cfg("mhc"), seed=5)
    for (name, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert meta.rope.shape == (cfg.max_seq_len, cfg.mla.qk_rope_head_dim // 2, 2)
    attn = direct.layers["0"].attn
    assert attn.wq_b.weight.std() > 1.5 * attn.wo.weight.std() > 0  # wo depth-scaled like the GQA attn.wo
    assert torch.equal(attn.kv_norm.weight, torch.ones(7)) and torch.equal(attn.q_norm.weight, torch.ones(10))


def test_config_rules():
    base = ["model=mla_test", "train=test"]
    assert load_config(base).model.attention == "mla"
    assert load_config(["model=test", "train=test"]).model.attention == "gqa"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(["model=test", "train=test", "model.attention=mqa"])
    with pytest.raises(ConfigError, match="model.mla.qk_rope_head_dim"):
        load_config([*base, "model.mla.qk_rope_head_dim=5"])
    with pytest.raises(ConfigError, match="model.mla.kv_lora_rank"):
        load_config([*base, "model.mla.kv_lora_rank=0"])


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_tiny_mla_model_trains_three_steps(arm, prepared_data, tmp_path):
    from mhc_train.train.metrics import read_metrics
    from mhc_train.train.trainer import Trainer

    overrides = {"model": "mla_test", "connection": arm, "train.max_steps": 3, "checkpoint.every": 3}
    summary = Trainer(load_config(run_overrides(prepared_data, tmp_path / "r", **overrides))).run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "r")["train"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert summary["tokens_per_s"] > 0
    if arm == "mhc":  # the checkpoint loads back as an MLA model (model.mla from the saved dict) and generates
        from mhc_train.infer.generate import SamplingConfig, generate
        from mhc_train.infer.load import load_checkpoint

        loaded = load_checkpoint(tmp_path / "r")
        assert loaded.model.cfg.mla == MLAConfig(16, 16, 8, 4, 6) and loaded.model.cfg.attention == "mla"
        assert len(generate(loaded.model, [[5, 6, 7]], SamplingConfig(max_new_tokens=4, stop_at_eos=False))[0]) == 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_flops_per_token_counts_mla_shapes(case):
    """The formula's matmul part equals what FlopCounterMode sees on an MLA model's forward (SDPA's math backend
    shows the scores and the value product as bmm); 6 x the matmul weights for the dense part."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mhc_train.train.throughput import flops_per_token

    cfg, seq, batch = mla_cfg(CASES[case][0]), 24, 2
    model = build_model(cfg, conn_cfg("residual"))
    f = flops_per_token(cfg, conn_cfg("residual"), seq)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (batch, seq)))
    assert (f["dense"] + f["attention"]) // 3 == counter.get_total_flops() / (batch * seq)
    weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in n)
    assert f["dense"] == 6 * weights


@pytest.mark.parametrize(
    "name, layers, dim, heads", [("3b", 12, 1280, 16), ("9b", 18, 1920, 24), ("27b", 30, 2560, 32)]
)
def test_paper_presets_have_table5_attention(name, layers, dim, heads):
    """The mHC paper's presets through the config loader (MLA with KV rank 512, RoPE 64 (theta 1e4), heads of 128,
    seq 4096, vocab 129280; the MoE keys of Table 5), built on the meta device one block deep."""
    import dataclasses

    from mhc_train.config import load_config

    cfg = load_config([f"model=mhc_paper_{name}"]).model
    assert (cfg.n_layer, cfg.dim, cfg.n_head, cfg.vocab_size) == (layers, dim, heads, 129280)
    assert cfg.ffn == "moe" and cfg.moe.top_k == 6 and cfg.moe.n_shared_experts == 2 and cfg.moe.first_k_dense == 1
    assert cfg.attention == "mla" and cfg.mla == MLAConfig(0, 512, 128, 64, 128)
    assert cfg.rope_theta == 10000.0 and cfg.max_seq_len == 4096
    model = build_model(dataclasses.replace(cfg, n_layer=1), conn_cfg("mhc"), device="meta")
    attn = sum(p.numel() for p in model.layers["0"].attn.parameters())
    assert attn == dim * heads * 192 + dim * 576 + 512 * heads * 256 + heads * 128 * dim + 512  # + the latent norm
    assert model.rope.shape == (4096, 32, 2)


class _Documents:
    """A document layout as attention takes it (`mask`, `rotate`): tokens attend within their document, whose RoPE
    positions restart at 0."""

    def __init__(self, lengths: list[int]):
        ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]  # [1, T]
        T = ids.shape[1]
        self.mask = ((ids[:, :, None] == ids[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]
        self.positions = torch.cat([torch.arange(n) for n in lengths])  # [T]

    def rotate(self, x, rope):
        from mhc_train.model.layers import apply_rope

        return apply_rope(x, rope[self.positions])


def test_document_layout_equals_each_document_alone():
    """A packed window of three documents under a document layout: each document's outputs equal the document run
    alone (the mask keeps attention inside it, the RoPE positions restart)."""
    shapes, _, _ = CASES["qlora10-B3-T9"]
    model = build_model(mla_cfg(shapes), conn_cfg("residual"), seed=4)
    attn, lengths = model.layers["0"].attn, [5, 1, 7]
    x = torch.randn(1, sum(lengths), 32, generator=torch.Generator().manual_seed(3))
    packed = attn(x, model.rope, doc=_Documents(lengths))
    alone = torch.cat([attn(part, model.rope) for part in x.split(lengths, dim=1)], dim=1)
    assert_close(packed, alone, atol=1e-6, rtol=1e-5, what="packed vs alone")
    assert not torch.allclose(attn(x, model.rope), alone, atol=1e-4)  # plain causal attention mixes the documents
