"""The Hugging Face export of every model the trainer trains beyond the dense paper arms (test_infer.py): MoE (residual,
mHC, and MLA + MoE), `connection.numerics: deepseek_v4` with the learned collapse, the mean collapse, HC with the
learned collapse, and single-pass mHC (DeepSeek and paper numerics). Each: the exported logits equal ours (fp32,
1e-5), the collapse after block 0 equals ours (output_hidden_states), transformers' KV-cached decode equals its full
forward, and its `generate()` gives our greedy tokens. import-hf reads an MoE + MLA export back (balancing biases included) with equal logits.

The sites are moved off their init with peaked res logits (bias noise 2, t_max 4, hc_eps 1e-3) so DeepSeek's
arithmetic, its eps placements and the routing's balancing bias all move the logits far beyond 1e-5."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mhc_train.config import MLAConfig, MoEConfig
from mhc_train.infer.export import export
from mhc_train.infer.generate import SamplingConfig, generate
from mhc_train.infer.load import Loaded
from tests.infer.test_export_serving import hf_tokenizer, load
from tests.support.configs import conn_cfg, tiny_model_cfg
from tests.support.numerics import assert_close

VOCAB = 96
MOE = dict(ffn="moe", moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_dim=16,
                                    first_k_dense=1, route_scale=1.5))  # fmt: skip
MLA = dict(attention="mla", mla=MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                          v_head_dim=5))  # fmt: skip
PEAKED = dict(phi_init_std=0.5, t_max=4, hc_eps=1e-3)  # Sinkhorn far from converged: eps and order matter
CASES = {  # id -> (connection overrides, model overrides)
    "moe-residual": (dict(arm="residual"), MOE),
    "moe-mhc": (dict(arm="mhc", phi_init_std=0.5), MOE),
    "moe-mla-mhc": (dict(arm="mhc", phi_init_std=0.5), {**MOE, **MLA}),
    "deepseek_v4-learned": (dict(arm="mhc", numerics="deepseek_v4", collapse="learned", **PEAKED), {}),
    "mean": (dict(arm="mhc", collapse="mean", phi_init_std=0.5), {}),
    "hc-learned": (dict(arm="hc", collapse="learned", hc_dynamic_scale_init=0.5), {}),
    "single_pass-deepseek_v4": (dict(arm="mhc", type="mhc_single_pass", numerics="deepseek_v4", **PEAKED), {}),
    "single_pass-paper": (dict(arm="mhc", type="mhc_single_pass", phi_init_std=0.5), {}),
}


def build(case: str, seed: int = 3):
    """The case's tiny model (fp32, eval), its sites, router and balancing biases moved off their init."""
    from mhc_train.model.transformer import build_model

    conn, model_kw = copy.deepcopy(CASES[case])  # a test may change its model's config
    model = build_model(tiny_model_cfg(vocab_size=VOCAB, init_std=0.2, **model_kw), conn_cfg(conn.pop("arm"), **conn),
                        seed=seed).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_conn." in name or ".gate." in name:
                p.add_((2.0 if name.endswith("_conn.bias") else 0.3) * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):  # a bias that changes which experts some tokens select
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("tok"))


def exported(case: str, tokenizer, out: Path):
    model = build(case)
    return model, load(export(Loaded(model, tokenizer, {}, out / "step.pt", 0), out / "hf"))


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_cached_decode_and_greedy_tokens_equal_ours(case, tokenizer, tmp_path):
    model, hf = exported(case, tokenizer, tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        out = hf(tokens, output_hidden_states=True)
        after_block0 = model.collapse_conn(model.layers["0"](model.embed(tokens), model.rope))
        step = [hf(tokens[:, :6], use_cache=True)]  # transformers' KV cache: prefix, then one token at a time
        for t in range(6, 13):
            step.append(hf(tokens[:, t : t + 1], past_key_values=step[-1].past_key_values, use_cache=True))
    assert_close(out.logits, ours, atol=1e-5, what=f"{case} export logits")
    assert_close(out.hidden_states[1], after_block0, atol=1e-5, what=f"{case} collapse after block 0")
    cached = torch.cat([s.logits for s in step], dim=1)
    assert_close(cached, out.logits, atol=1e-5, what=f"{case} export cached decode vs full forward")
    assert ours.std() > 0.5  # logits far from flat: a wrong site, route or collapse shows beyond 1e-5
    prompts = [[5, 9, 14, 3, 22], [41, 2, 8, 1, 7]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=5), eos_id=tokenizer.eos_id)  # rows end at EOS
    theirs = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=5,
                         do_sample=False)[:, 5:].tolist()  # fmt: skip
    assert [row[: len(mine)] for row, mine in zip(theirs, greedy)] == greedy


def test_moe_export_writes_the_balancing_bias_config_and_every_modeling_file(tokenizer, tmp_path):
    import json

    from safetensors.torch import load_file

    model, hf = exported("moe-mla-mhc", tokenizer, tmp_path)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(weights["model.layers.1.ffn.expert_bias"], model.layers["1"].ffn.expert_bias)
    assert "model.layers.0.ffn.expert_bias" not in weights  # first_k_dense: block 0 stays dense
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["ffn"] == "moe" and config["moe"]["n_routed_experts"] == 4 and config["attention"] == "mla"
    modeling = {"modeling_mhc.py", "configuration_mhc.py", "connections_mhc.py", "layers_mhc.py"}
    assert modeling <= {p.name for p in (tmp_path / "hf").glob("*.py")}
    hf.save_pretrained(tmp_path / "again")  # transformers copies the remote code with its relative imports
    assert modeling <= {p.name for p in (tmp_path / "again").glob("*.py")}
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(load(tmp_path / "again")(tokens).logits, model(tokens), atol=1e-5, what="save_pretrained copy")


def test_a_capacity_factor_moe_is_refused(tokenizer, tmp_path):
    from mhc_train.infer.errors import InferenceError

    model = build("moe-residual")
    model.cfg.moe.capacity_factor = 1.25
    with pytest.raises(InferenceError, match="capacity_factor=1.25 drops tokens"):
        export(Loaded(model, tokenizer, {}, tmp_path / "s.pt", 0), tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["dcp", "file"])
def test_import_hf_reads_an_moe_mla_export_back(fmt, tmp_path):
    """import-hf on our own MoE + MLA export: the model config's nested sections and the balancing biases come back."""
    from mhc_train.data.tokenizer import HFTokenizer
    from mhc_train.infer.import_hf import import_hf
    from mhc_train.infer.load import load_checkpoint

    hf_tokenizer(tmp_path)
    model = build("moe-mla-mhc")
    out = export(Loaded(model, HFTokenizer(tmp_path / "tokenizer.json"), {}, tmp_path / "s.pt", 0), tmp_path / "hf")
    back = load_checkpoint(import_hf(out, None, tmp_path / "run", fmt=fmt)).model
    assert back.cfg.ffn == "moe" and back.cfg.moe.route_scale == 1.5 and back.cfg.mla.kv_lora_rank == 10
    assert torch.equal(back.layers["1"].ffn.expert_bias, model.layers["1"].ffn.expert_bias)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(back(tokens), model(tokens), atol=1e-6, what=f"import-hf ({fmt}) of an MoE export")
