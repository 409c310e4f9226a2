"""Per-document attention (data.document_mask): a packed window computes what each of its documents computes alone,
values and gradients, and the switch reaches the model through the trainer. (Masking off is the unchanged default
path: tests/train/test_golden_losses.py pins its per-step losses bit for bit.)"""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import load_config
from mhc_train.model.documents import document_ids, document_layout
from mhc_train.model.layers import apply_rope, rope_cache
from mhc_train.model.transformer import build_model
from tests.support.configs import conn_cfg, run_overrides, tiny_model_cfg

EOS = 1
LENGTHS = [(5, 7, 4), (9, 7)]  # documents per row of a T=16 window (each ends with EOS, the last one cut short)


def _window(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 256, (n,), generator=g) for n in lengths]
    for d in docs[:-1]:
        d[-1] = EOS
    return docs


def test_document_ids_and_restarted_positions():
    tokens = torch.tensor([[5, 1, 7, 8, 1, 9], [1, 1, 3, 4, 5, 6]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    layout = document_layout(ids, restart_positions=True)
    assert layout.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    assert layout.mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    x, rope = torch.randn(2, 6, 2, 8), rope_cache(8, 16, 10000.0)
    rotated = layout.rotate(x, rope)
    assert torch.equal(rotated[1, 2:], apply_rope(x[1:, 2:], rope[:4])[0])  # the third document from position 0
    assert not torch.equal(rotated[1, 2:], apply_rope(x[1:], rope[:6])[0, 2:])


@pytest.mark.parametrize("arm", ["residual", "mhc"])
def test_packed_window_equals_each_document_alone(arm):
    """Logits and every parameter gradient of two packed rows (documents masked, RoPE restarted) equal those of the
    documents run one by one."""
    model = build_model(tiny_model_cfg(n_kv_head=2), conn_cfg(arm, phi_init_std=0.5), seed=3)
    model.use_documents(EOS, restart_rope=True)
    rows = [_window(lengths, seed) for seed, lengths in enumerate(LENGTHS)]
    packed = torch.stack([torch.cat(docs) for docs in rows])  # [2, 16]
    upstream = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(7))
    logits = model(packed)
    (logits * upstream).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone, total = [], 0.0
    for b, docs in enumerate(rows):
        t0 = 0
        for d in docs:
            out = model(d[None])  # [1, n, V]: one document, plain causal attention
            total = total + (out[0] * upstream[b, t0 : t0 + len(d)]).sum()
            alone.append((b, t0, out[0]))
            t0 += len(d)
    total.backward()
    for b, t0, out in alone:
        diff = (logits[b, t0 : t0 + len(out)] - out).abs().max().item()
        assert diff < 1e-5, f"row {b} document at {t0}: max abs diff {diff:.3g}"
    for name, p in model.named_parameters():
        diff = (packed_grads[name] - p.grad).abs().max().item()
        scale = p.grad.abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), f"{name}: max abs diff {diff:.3g} (grad scale {scale:.3g})"


def test_without_the_mask_documents_see_each_other():
    """The control: the same packed row without `use_documents` differs from the documents alone (after the first),
    so the equality above is the mask's doing."""
    model = build_model(tiny_model_cfg(), conn_cfg("residual"), seed=3)
    docs = _window(LENGTHS[0], 0)
    with torch.no_grad():
        packed = model(torch.cat(docs)[None])[0]
        second = model(docs[1][None])[0]
    assert (packed[5:12] - second).abs().max() > 1e-3


def test_trainer_turns_the_mask_on(prepared_data, tmp_path):
    from mhc_train.train.trainer import Trainer

    over = {"data.document_mask": "true", "data.document_rope_restart": "true", "train.max_steps": 1}
    t = Trainer(load_config(run_overrides(prepared_data, tmp_path / "r", **over)))
    try:
        assert t.model.document_eos == t.eos_id == 1 and t.model.document_rope_restart
        assert t.model.document_kernel == "sdpa"  # data.document_mask_kernel=auto on CPU
        x, _ = t.data.train_batch(0, 0, 0, 4, 32)
        assert t.model.document_layout(x) is not None
    finally:
        t.close()
