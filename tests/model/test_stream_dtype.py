"""Stream storage dtype (model.stream_dtype): bf16 streams, the mHC paper's setting, with the coefficient path and
the stream math in fp32. Under torch.autocast the torch backend's stream math (H_pre read, H_res mix + H_post write)
stays fp32 like the Triton kernels' (autocast used to run those matmuls in bf16, so the two backends disagreed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mhc_train import ops
from mhc_train.config import ConfigError, ConnectionConfig, ModelConfig, load_config

ARMS = {
    "residual": ConnectionConfig(type="residual", n_streams=1, backend="torch"),
    "hc": ConnectionConfig(type="hc", n_streams=4, backend="torch"),
    "mhc": ConnectionConfig(type="mhc", n_streams=4, backend="torch", t_max=4),
}
MODEL = ModelConfig(vocab_size=256, dim=32, n_layer=2, n_head=2, max_seq_len=32, init_std=0.2)


def _run(model_cfg, conn_cfg, tokens):
    """Logits, every block output's dtype and the parameters' gradients of one bf16-autocast forward/backward."""
    from mhc_train.model import build_model

    model = build_model(model_cfg, conn_cfg, seed=1)
    dtypes = []
    for layer in model.layers.values():
        layer.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    return logits.float(), dtypes, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arm", list(ARMS))
def test_bf16_streams_are_stored_in_bf16_and_track_fp32_streams(arm):
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, ref_dtypes, _ = _run(MODEL, ARMS[arm], tokens)
    got, dtypes, grads = _run(dataclasses.replace(MODEL, stream_dtype="bf16"), ARMS[arm], tokens)
    assert ref_dtypes == [torch.float32] * 2 and dtypes == [torch.bfloat16] * 2, (ref_dtypes, dtypes)
    assert not torch.equal(got, ref)  # the storage really changed ...
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()  # ... by bf16 rounding only
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 master weights and their gradients


def test_bf16_streams_triton_backend_matches_torch_backend():
    """The kernels take bf16 streams and keep them bf16; same model, same numbers as the torch backend (the stream
    math is fp32 on both, so they differ by bf16 rounding at different places only)."""
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model = dataclasses.replace(MODEL, n_layer=1, stream_dtype="bf16")
    ref, _, ref_grads = _run(model, ARMS["mhc"], tokens)
    got, dtypes, grads = _run(model, dataclasses.replace(ARMS["mhc"], backend="triton"), tokens)
    assert dtypes == [torch.bfloat16]
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    for name in ("layers.0.attn_conn.phi", "layers.0.ffn_conn.phi", "layers.0.attn.wq.weight"):
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 0.05, (name, err)


def test_torch_stream_math_ignores_autocast():
    """H_pre x and H_res x + H_post^T y in fp32 inside a bf16 autocast region (bit-equal to outside it)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    h_pre, h_post, h_res = torch.rand(3, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g), torch.rand(3, 5, 4, 4)
    plain = ops.mhc_pre(x, h_pre), ops.mhc_post_res(x, y, h_post, h_res)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = ops.mhc_pre(x, h_pre), ops.mhc_post_res(x, y, h_post, h_res)
    for a, b in zip(plain, cast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_bf16_streams_need_bf16_compute():
    with pytest.raises(ConfigError, match=r"model.stream_dtype.*train.precision=bf16"):
        load_config(["model=test", "train=test", "model.stream_dtype=bf16", "train.precision=fp32"])
    with pytest.raises(ConfigError, match=r"model.stream_dtype='fp16'.*fp32, bf16"):
        load_config(["model=test", "train=test", "model.stream_dtype=fp16"])
    load_config(["model=test", "train=test", "model.stream_dtype=bf16", "train.precision=bf16"])


def test_bf16_streams_with_auto_precision_on_cpu_are_refused_at_build(tmp_path):
    """precision=auto is fp32 on CPU: the engine build says so instead of failing inside a matmul."""
    from mhc_train.model import build_model
    from mhc_train.parallel import DistInfo, build_engine

    cfg = load_config(["model=test", "train=test", "model.stream_dtype=bf16", "train.precision=auto"])
    model = build_model(cfg.model, cfg.connection)
    with pytest.raises(ConfigError, match=r"train.precision='auto' runs fp32 on cpu.*model.stream_dtype=fp32"):
        build_engine(model, cfg, DistInfo())
