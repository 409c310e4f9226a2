"""data.document_mask_kernel (issue 29): the flex-attention path of per-document attention equals the SDPA-mask path,
and the knob resolves (auto: sdpa on CPU) or refuses (flex without CUDA) in one line.

torch 2.13's flex_attention runs its forward eagerly on CPU but has no CPU backward, so values are compared here and
gradients on CUDA (scripts/bench_data.py's attention benchmark records the flex-vs-sdpa gradient difference)."""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import load_config
from mhc_train.config.schema import ConfigError, MLAConfig
from mhc_train.model.documents import document_kernel, flex_available
from mhc_train.model.transformer import build_model
from tests.support.configs import conn_cfg, tiny_model_cfg

EOS = 1
MLA = MLAConfig(q_lora_rank=0, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)

needs_flex = pytest.mark.skipif(not flex_available(), reason="this torch has no flex_attention")


def _packed(seed: int = 0) -> torch.Tensor:
    """Two rows of T=16: documents of 5, 7, 4 and 9, 7 tokens (each but the last of a row ends with EOS)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 256, (2, 16), generator=g)
    x[0, [4, 11]] = EOS
    x[1, 8] = EOS
    return x


@needs_flex
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_flex_equals_sdpa_mask(attention):
    """Logits of a packed batch (documents masked, RoPE restarted) through flex_attention equal the SDPA-mask path's,
    for grouped-query attention and MLA (its own scale and value width)."""
    cfg = tiny_model_cfg(n_kv_head=2) if attention == "gqa" else tiny_model_cfg(attention="mla", mla=MLA)
    model = build_model(cfg, conn_cfg("mhc", phi_init_std=0.5), seed=3)
    x = _packed()
    out = {}
    for kernel in ("sdpa", "flex"):
        model.use_documents(EOS, restart_rope=True, kernel=kernel)
        layout = model.document_layout(x)
        assert (layout.block_mask is not None) == (kernel == "flex") and (layout.mask is None) == (kernel == "flex")
        with torch.no_grad():
            out[kernel] = model(x)
    diff = (out["flex"] - out["sdpa"]).abs().max().item()
    assert diff < 1e-5, f"flex vs sdpa: max abs diff {diff:.3g}"
    model.use_documents(None)
    with torch.no_grad():  # the control: without documents the logits differ, so the equality is the masks' doing
        assert (model(x) - out["flex"]).abs().max() > 1e-3


def test_kernel_knob_resolves_and_refuses():
    assert document_kernel("auto", "cpu") == "sdpa"
    assert document_kernel("sdpa", "cuda") == "sdpa"
    assert document_kernel("auto", torch.device("cuda")) == "sdpa"  # flex is opt-in until a GPU has run it
    with pytest.raises(ConfigError, match="no backward on cpu") as e:
        document_kernel("flex", "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="allowed: auto, sdpa, flex"):
        load_config(["data.document_mask=true", "data.document_mask_kernel=varlen"])
    with pytest.raises(ConfigError, match="no backward on CPU"):
        load_config(["data.document_mask=true", "data.document_mask_kernel=flex", "train.device=cpu"])
    assert (
        load_config(["data.document_mask=true", "data.document_mask_kernel=flex"]).data.document_mask_kernel == "flex"
    )
