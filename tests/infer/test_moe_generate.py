"""generate on MoE models: the KV-cached decode (GQA's per-layer cache, MLA's latent cache) routes each new token as
the full forward does, so its logits equal the full forward's and `generate` gives the tokens of greedy decoding by
full forwards over the growing sequence (residual and mHC; MoE + MLA), left-padded batches included."""

from __future__ import annotations

import pytest
import torch

from mhc_train.infer.generate import Decoder, SamplingConfig, generate
from tests.infer.test_export_arms import build
from tests.support.numerics import assert_close


def greedy_by_full_forwards(model, prompt: list[int], new: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("case", ["moe-residual", "moe-mla-mhc"])
def test_moe_kv_cache_decode_and_generate_equal_full_forwards(case):
    model = build(case)  # router and balancing biases off their init (test_export_arms.py)
    tokens = torch.randint(0, 96, (2, 15), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)  # [B, T, V]
    dec = Decoder(model)
    cache = dec.new_cache(2, 15)
    steps = [dec.forward(tokens[:, :5], cache, all_logits=True)]
    steps += [dec.forward(tokens[:, t : t + 1], cache, all_logits=True) for t in range(5, 15)]
    assert_close(torch.cat(steps, 1), full, atol=1e-5, what=f"{case} cached vs full logits")
    prompts = [[5, 9, 14, 3, 22, 7], [41, 2, 8]]  # left-padded to one batch
    got = generate(model, prompts, SamplingConfig(max_new_tokens=6, stop_at_eos=False))
    assert got == [greedy_by_full_forwards(model, p, 6) for p in prompts]
    assert len({tuple(r) for r in got}) > 1
