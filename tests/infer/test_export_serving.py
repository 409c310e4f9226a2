"""The export for serving engines (vLLM's and SGLang's Transformers backends): every layer's attention through
transformers' ALL_ATTENTION_FUNCTIONS with its layer_idx and the caller's kwargs, eager and SDPA equal,
output_attentions / output_hidden_states, transformers' generate with its own cache equal to ours on left-padded
batches, and a tokenizer.json run exported as a PreTrainedTokenizerFast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mhc_train.infer.export import export
from mhc_train.infer.generate import SamplingConfig, generate
from mhc_train.infer.load import Loaded
from tests.support.configs import decode_model
from tests.support.numerics import assert_close

VOCAB = 96


def hf_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mhc_train.data.tokenizer import HFTokenizer

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return HFTokenizer(directory / "tokenizer.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An mHC model (moved off its init), its qk-norm and q/k/v biases on, exported with a tokenizer.json."""
    root = tmp_path_factory.mktemp("serving")
    model = decode_model("mhc", vocab_size=VOCAB, qkv_bias=True, qk_norm=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wq.bias", "wk.bias", "q_norm.weight")):
                p.add_(0.2 * torch.randn_like(p))
    loaded = Loaded(model, hf_tokenizer(root), {}, root / "step.pt", 0)
    return loaded, export(loaded, root / "hf")


def load(directory, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, **kw).eval()


def test_a_registered_attention_function_is_called_by_every_layer_with_its_kwargs(exported):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    loaded, directory = exported
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, kwargs.get("probe")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mhc_test_recording", recording)
    hf = load(directory, attn_implementation="mhc_test_recording")
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = hf(tokens, probe="passed down").logits
    n = loaded.model.cfg.n_layer
    assert calls == [(i, "passed down") for i in range(n)], calls
    assert_close(out, loaded.model(tokens), atol=1e-5, what="custom attention function logits")


def test_eager_and_sdpa_give_the_same_logits_and_outputs(exported):
    loaded, directory = exported
    tokens = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded row
    eager, sdpa = load(directory, attn_implementation="eager"), load(directory, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        a = eager(tokens, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        b = sdpa(tokens, attention_mask=mask, output_hidden_states=True)
    assert_close(a.logits, b.logits, atol=1e-5, what="eager vs sdpa logits")
    assert_close(a.logits[0], loaded.model(tokens[:1])[0], atol=1e-5, what="eager vs mhc-train logits")
    n, H = loaded.model.cfg.n_layer, loaded.model.cfg.n_head
    assert len(a.attentions) == n and a.attentions[0].shape == (2, H, 11, 11)
    assert torch.allclose(a.attentions[0].sum(-1), torch.ones(2, H, 11))
    assert len(a.hidden_states) == n + 1 and a.hidden_states[-1].shape == (2, 11, loaded.model.cfg.dim)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_generate_equals_ours_on_a_left_padded_batch(exported, impl):
    loaded, directory = exported
    hf = load(directory, attn_implementation=impl)
    prompts = [[5, 9, 14, 3, 22, 7], [41, 2, 8]]
    ours = generate(loaded.model, prompts, SamplingConfig(max_new_tokens=6, stop_at_eos=False))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out[:, width:].tolist() == ours


def test_a_tokenizer_json_run_exports_a_fast_tokenizer(exported):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loaded, directory = exported
    tok = AutoTokenizer.from_pretrained(directory)
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "t5 t17 t3 t94"
    assert tok(text, add_special_tokens=False)["input_ids"] == loaded.tokenizer.encode(text)
    assert tok.eos_token_id == loaded.tokenizer.eos_id


@pytest.mark.parametrize("arm", ["hc", "mhc", "mhc_identity"])
def test_the_decode_sites_equal_the_training_math(arm, tmp_path):
    from mhc_train.data.tokenizer import HFTokenizer

    model = decode_model(arm, vocab_size=VOCAB)
    hf_tokenizer(tmp_path)
    hf = load(
        export(Loaded(model, HFTokenizer(tmp_path / "tokenizer.json"), {}, tmp_path / "s.pt", 0), tmp_path / "hf")
    )
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        fast = hf(tokens).logits  # the regrouped decode sites (no autograd, fp32)
    plain = hf(tokens).logits.detach()  # autograd on: the plain training math
    assert_close(fast, plain, atol=1e-5, what=f"{arm} decode sites vs training math")
    with torch.no_grad():
        assert_close(fast, model(tokens), atol=1e-5, what=f"{arm} export vs mhc-train")
