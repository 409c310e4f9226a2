"""mhc_train.train.throughput: FLOPs per token against torch's FLOP counter on the real model, the peak table, MFU
arithmetic and the step timer."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mhc_train.config import ConnectionConfig, ModelConfig
from mhc_train.model import build_model, lm_loss
from mhc_train.train.throughput import (
    MATMUL_PARTS,
    PEAK_TFLOPS,
    StepTimer,
    device_peak_tflops,
    flops_per_token,
    mfu,
    site_flops,
)

SEQ, BATCH = 32, 2
MODELS = {
    "mha": ModelConfig(vocab_size=512, dim=64, n_layer=2, n_head=4, max_seq_len=64),
    "gqa": ModelConfig(vocab_size=384, dim=64, n_layer=3, n_head=4, n_kv_head=2, head_dim=24, ffn_hidden_dim=96),
}
ARMS = {
    "residual": ConnectionConfig(type="residual", n_streams=1, backend="torch"),
    "hc": ConnectionConfig(type="hc", n_streams=4, backend="torch"),
    "hc_static": ConnectionConfig(type="hc", n_streams=4, hc_dynamic=False, backend="torch"),
    "mhc": ConnectionConfig(type="mhc", n_streams=4, backend="torch"),
    "mhc_identity": ConnectionConfig(type="mhc", n_streams=4, h_res="identity", backend="torch"),
    "mhc_n2": ConnectionConfig(type="mhc", n_streams=2, t_max=5, backend="torch"),
}


def counted(model_cfg, conn_cfg, backward=False) -> float:
    """FLOPs per token that FlopCounterMode sees on the real model (CPU): matmuls only. SDPA's math backend makes
    the attention scores visible to it as two bmm (the CPU flash kernel has no FLOP formula registered)."""
    model = build_model(model_cfg, conn_cfg)
    tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, SEQ + 1))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens[:, :-1])
        if backward:
            lm_loss(logits, tokens[:, 1:]).backward()
    return counter.get_total_flops() / (BATCH * SEQ)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("arm", list(ARMS))
def test_flops_per_token_matches_the_flop_counter(model_name, arm):
    m, c = MODELS[model_name], ARMS[arm]
    f = flops_per_token(m, c, SEQ)
    assert f["total"] == f["dense"] + f["attention"] + f["connection"]
    forward = counted(m, c)
    # the matmul part of the formula is exact: dense + attention + the sites' matmul parts, forward
    matmul_sites = 2 * m.n_layer * sum(v for k, v in site_flops(c, m.dim).items() if k in MATMUL_PARTS)
    assert (f["dense"] + f["attention"]) // 3 + matmul_sites == forward
    # the whole formula (elementwise connection work included) against 3x the counted forward: within 10%
    assert f["total"] == pytest.approx(3 * forward, rel=0.10)


@pytest.mark.parametrize("arm", ["residual", "mhc"])
def test_training_is_three_forwards(arm):
    """The counter over forward + backward sees exactly 3x the forward's matmul FLOPs (TRAIN_FACTOR)."""
    m, c = MODELS["mha"], ARMS[arm]
    assert counted(m, c, backward=True) == pytest.approx(3 * counted(m, c), rel=1e-9)


def test_connection_terms():
    m = MODELS["mha"]
    residual, hc, mhc = (flops_per_token(m, ARMS[a], SEQ) for a in ("residual", "hc", "mhc"))
    assert residual["connection"] / residual["total"] < 0.01  # the add only
    assert residual["connection"] == 3 * 2 * m.n_layer * m.dim
    assert residual["dense"] == mhc["dense"] == hc["dense"] and residual["attention"] == mhc["attention"]
    assert mhc["total"] > hc["total"] > residual["total"]
    n, C = 4, m.dim
    site = site_flops(ARMS["mhc"], C)
    assert site["project"] == 2 * n * C * (n * n + 2 * n) and site["pre"] == 2 * n * C
    assert site["res"] + site["post"] == 2 * n * n * C + 2 * n * C and site["sinkhorn"] == 2 * n * n + 20 * 4 * n * n
    assert site_flops(ARMS["hc"], C)["project"] == 2 * n * C * (n + 2)
    assert set(site_flops(ARMS["hc_static"], C)) == {"pre", "res", "post"}
    assert site_flops(ARMS["mhc_identity"], C)["res"] == 0


def test_attention_convention():
    """PaLM: 12 L T H D per token for training, the full square; causal=True halves it. Linear in seq_len."""
    m, c = MODELS["gqa"], ARMS["mhc"]
    f = flops_per_token(m, c, 1024)
    assert f["attention"] == 12 * m.n_layer * 1024 * m.n_head * m.head_dim
    assert flops_per_token(m, c, 1024, causal=True)["attention"] == f["attention"] // 2
    assert flops_per_token(m, c, 2048)["attention"] == 2 * f["attention"]
    assert flops_per_token(m, c, 2048)["dense"] == f["dense"]


def test_dense_is_six_times_the_matmul_weights():
    m = ModelConfig(vocab_size=1000, dim=128, n_layer=3, n_head=8, n_kv_head=2, tie_embeddings=True)
    model = build_model(m, ARMS["residual"], device="meta")
    weights = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in name)
    weights += m.vocab_size * m.dim  # tied: the head's matmul still runs, its weight is the embedding's
    assert flops_per_token(m, ARMS["residual"], 64)["dense"] == 6 * weights


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 SXM5 80GB", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 989.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("H100 SXM", 989.0),
        ("NVIDIA L40", None),
        ("NVIDIA GB200", None),
        ("Tesla T4", None),
        ("cpu", None),
        ("", None),
    ],
)
def test_device_peak_tflops(name, peak):
    assert device_peak_tflops(name) == peak


def test_peak_table_and_override():
    assert PEAK_TFLOPS["H100 SXM"] == 989 and PEAK_TFLOPS["H200"] == 989 and PEAK_TFLOPS["B200"] == 2250
    assert PEAK_TFLOPS["H100 PCIe"] == 756 and PEAK_TFLOPS["A100"] == 312 and PEAK_TFLOPS["L40S"] == 362
    assert device_peak_tflops("cpu", override=100) == 100.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", override=500) == 500.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", override=0) == 989.0


def test_mfu():
    # 10k tokens/s x 6e10 FLOPs/token = 6e14 FLOP/s on a 1000 TFLOPS device: 60%
    assert mfu(10_000, 6e10, 1000.0) == pytest.approx(0.6)
    assert mfu(0, 6e10, 989.0) == 0.0
    assert mfu(10_000, 6e10, None) is None
    assert mfu(10_000, 6e10, 0) is None
    f = flops_per_token(MODELS["mha"], ARMS["mhc"], SEQ)["total"]
    assert mfu(1e6, f, device_peak_tflops("NVIDIA H200")) == pytest.approx(1e6 * f / 989e12)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_step_timer():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    for _ in range(4):
        with timer("data"):
            clock.t += 0.5
        for _ in range(2):  # two micro-batches, with communication nested inside
            with timer("forward_backward"):
                clock.t += 1.0
                with timer("communication"):
                    clock.t += 0.25
        with timer("optimizer"):
            clock.t += 0.1
        timer.step()
    assert timer.steps == 4
    w = timer.window()
    assert list(w) == ["data", "forward_backward", "communication", "optimizer"]
    assert w == pytest.approx({"data": 0.5, "forward_backward": 2.5, "communication": 0.5, "optimizer": 0.1})
    assert timer.window() == {} and timer.steps == 0  # reset
    with pytest.raises(RuntimeError):  # a phase that raises still counts its time
        with timer("data"):
            clock.t += 2.0
            raise RuntimeError
    timer.add("communication", 1.0)
    assert timer.window(steps=2) == pytest.approx({"data": 1.0, "communication": 0.5})
    with timer("data"):  # no step() marked and no steps given: totals
        clock.t += 3.0
    assert timer.window() == pytest.approx({"data": 3.0})


def test_step_timer_real_clock():
    timer = StepTimer()
    with timer("x"):
        sum(range(1000))
    timer.step()
    assert timer.window()["x"] >= 0.0
