"""import-hf reads an export written with `--hc-names deepseek` (DeepSeek-V4's names for the mHC sites and the
learned collapse): a tiny mhc model (numerics deepseek_v4, collapse learned) exported so and imported back gives the
same logits (fp32, 1e-6), through the streamed DCP path and the one-file path."""

from __future__ import annotations

import json

import pytest
import torch

from mhc_train.infer.errors import InferenceError
from tests.support.configs import conn_cfg, tiny_model_cfg

VOCAB = 64


def _loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mhc_train.data.tokenizer import HFTokenizer
    from mhc_train.infer.load import Loaded
    from mhc_train.model.transformer import build_model

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = conn_cfg("mhc", numerics="deepseek_v4", collapse="learned", phi_init_std=0.5)
    model = build_model(tiny_model_cfg(vocab_size=VOCAB), cfg, seed=4).eval()
    with torch.no_grad():  # off the init: non-trivial site biases and head
        g = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if "_conn." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return Loaded(model, HFTokenizer(tmp_path / "tokenizer.json"), {}, tmp_path / "step.pt", 0)


def test_import_hf_reads_deepseek_named_export(tmp_path):
    from mhc_train.infer.export import export
    from mhc_train.infer.import_hf import import_hf
    from mhc_train.infer.load import load_checkpoint

    loaded = _loaded(tmp_path)
    out = export(loaded, tmp_path / "ds", hc_names="deepseek")
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaded.model(tokens)
    for fmt in ("dcp", "file"):
        back = load_checkpoint(import_hf(out, None, tmp_path / f"back_{fmt}", fmt=fmt))
        conn = back.model.conn_cfg
        assert (conn.type, conn.numerics, conn.collapse) == ("mhc", "deepseek_v4", "learned")
        with torch.no_grad():
            err = (back.model(tokens) - want).abs().max().item()
        assert err <= 1e-6, f"{fmt}: import of the DeepSeek-named export differs by {err}"

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hc_mult": config["hc_mult"] + 1}))
    with pytest.raises(InferenceError, match="hc_mult=5 disagrees"):
        import_hf(out, None, tmp_path / "bad")


def test_a_site_split_across_shards_waits_for_its_tensors():
    from mhc_train.infer.import_deepseek import from_deepseek_names

    k, n_c = 4 * 4 + 8, 8
    site = {"model.layers.0.attn_hc.fn": torch.randn(k, n_c), "model.layers.0.attn_hc.base": torch.randn(k),
            "model.layers.0.attn_hc.scale": torch.randn(3)}  # fmt: skip
    pending = {}
    first = from_deepseek_names({"model.layers.0.attn_hc.fn": site["model.layers.0.attn_hc.fn"], "x": torch.ones(1)},
                                pending)  # fmt: skip
    assert set(first) == {"x"} and set(pending) == {"model.layers.0.attn_hc.fn"}
    rest = {key: v for key, v in site.items() if not key.endswith(".fn")}
    second = from_deepseek_names(rest, pending)
    assert not pending and set(second) == {"model.layers.0.attn_conn.phi", "model.layers.0.attn_conn.bias",
                                           "model.layers.0.attn_conn.alpha"}  # fmt: skip
