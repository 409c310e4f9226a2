"""MLA models at inference: the decode cache (`mhc_train/infer/mla_cache.py`) holds the compressed latent
(kv_lora_rank + the RoPE width per token and layer, no per-head keys or values), decoding through it (wkv_b absorbed)
equals the full forward for every arm, padded batches included; the Hugging Face export gives equal logits and the
same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import MLAConfig
from mhc_train.infer.generate import Decoder, SamplingConfig, generate
from mhc_train.infer.load import Loaded
from tests.support.configs import decode_model
from tests.support.numerics import assert_close

MLA = dict(attention="mla", mla=MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
                                          v_head_dim=5), init_std=0.2)  # fmt: skip
GREEDY = SamplingConfig(max_new_tokens=6, stop_at_eos=False)


@pytest.mark.parametrize("arm", ["residual", "hc", "mhc"])
def test_latent_cache_decode_equals_full_forward(arm):
    model = decode_model(arm, **MLA)
    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)  # [B, T, V]
    dec = Decoder(model)
    cache = dec.new_cache(2, 19)
    assert cache.k.shape == (2, 2, 1, 19, 10 + 4) and cache.v is None  # [layers, B, one latent, slots, R + P]
    steps = [dec.forward(tokens[:, :5], cache, all_logits=True)]
    steps += [dec.forward(tokens[:, t : t + 1], cache, all_logits=True) for t in range(5, 19)]
    assert_close(torch.cat(steps, 1), full, atol=1e-5, what=f"{arm} MLA cached vs full logits")
    assert full.std() > 0.1  # the logits are not flat: a wrong position or key would show


def test_padded_batch_decodes_like_one_prompt_at_a_time():
    model = decode_model("mhc", **MLA)
    prompts = [list(range(3, 15)), [7, 9, 11], list(range(40, 47))]
    batched = generate(model, prompts, GREEDY)
    assert batched == [generate(model, [p], GREEDY)[0] for p in prompts]
    assert len({tuple(r) for r in batched}) > 1


@pytest.mark.parametrize("arm, q_lora_rank", [("mhc", 12), ("residual", 0)])
def test_export_round_trip_logits_and_greedy_tokens(arm, q_lora_rank, prepared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from mhc_train.data.tokenizer import Tokenizer
    from mhc_train.infer.export import export

    mla = {**MLA, "mla": MLAConfig(**{**MLA["mla"].__dict__, "q_lora_rank": q_lora_rank})}
    model = decode_model(arm, vocab_size=512, **mla)
    tok = Tokenizer(prepared_data / "tokenizer.model")
    out = export(Loaded(model, tok, {}, tmp_path / "step.pt", 0), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(hf(tokens).logits, model(tokens), atol=1e-5, what=f"{arm} MLA export logits")
    for text in ("HAMLET. To be, or not", "OPHELIA. My lord"):  # both stop at EOS (kept in the output)
        ids = tok.encode(text)
        ours = generate(model, [ids], SamplingConfig(max_new_tokens=6), eos_id=tok.eos_id)[0]
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        assert theirs[0, len(ids) :].tolist() == ours, text
