"""A pipeline's stages under bf16 autocast at dp = 1, and its last stage's loss, in one process (`build_pipeline`
with pp=1: every stage on this rank, the real schedule objects, one gloo rank).

- bf16 compute weights: the stages are FSDP2 units over a one-rank mesh (bf16 gathers from fp32 master shards, the
  connection sites fp32), so when backward starts autograd holds no bf16 copy of a weight (main: autocast's copy of
  every fp32 weight, 425,984 bytes here), and over the step at most the units computing (106,496 bytes); per block
  under the split-backward schedules too (main: one fp32 unit or none). The loss and gradients equal one process's to the bf16 tolerance of tests/parallel/test_recompute_fsdp.py.
- fp32 runs are unchanged: no FSDP at dp = 1.
- Chunked cross-entropy on the last stage: forced into chunks, the head never sees more than one chunk's tokens
  (main: the whole micro-batch's [B, T, V] logits), and the loss equals the one-chunk loss.
"""

from __future__ import annotations

import weakref

import pytest
import torch

BATCH, SEQ = 4, 16


def _cfg(schedule: str, precision: str, microbatches: int):
    from mhc_train.config import load_config

    return load_config(
        ["model=test", "train=test", "connection=mhc", "model.n_layer=4", "model.dim=64", f"train.batch_size={BATCH}",
         f"train.seq_len={SEQ}", f"train.precision={precision}", "parallel.pp=2", f"parallel.pp_schedule={schedule}",
         f"parallel.pp_microbatches={microbatches}"]
    )  # fmt: skip


def _batch():
    tokens = torch.randint(0, 512, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return tokens[:, :-1], tokens[:, 1:]


class _SavedWeights:
    """Bytes of the bf16 weight-shaped tensors autograd holds (distinct live storages; one FSDP has freed counts 0):
    when backward starts, and at their peak (sampled at every pack and unpack)."""

    def __init__(self, modules):
        self.shapes = {tuple(p.shape) for m in modules for p in m.parameters() if p.ndim == 2}
        self.weight_bytes = sum(2 * p.numel() for m in modules for p in m.parameters() if p.ndim == 2)
        self.saved, self.at_backward, self.peak = [], None, 0

    def held(self) -> int:
        alive = [s for s in (r() for r in self.saved) if s is not None]
        weights = [s for s in alive if s.dtype == torch.bfloat16 and tuple(s.shape) in self.shapes]
        return sum({s.untyped_storage().data_ptr(): s.untyped_storage().nbytes() for s in weights}.values())

    def pack(self, t):
        self.saved.append(weakref.ref(t))
        self.peak = max(self.peak, self.held())
        return t

    def unpack(self, t):
        held = self.held()
        self.at_backward = held if self.at_backward is None else self.at_backward
        self.peak = max(self.peak, held)
        return t


def _step(schedule: str, precision: str, microbatches: int = 2) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from mhc_train.model import build_model
    from mhc_train.parallel.build import build_pipeline
    from mhc_train.parallel.dist import DistInfo

    cfg = _cfg(schedule, precision, microbatches)
    engine = build_pipeline(build_model(cfg.model, cfg.connection, seed=0, device="meta"), cfg, DistInfo(0, 1), pp=1)
    x, y = _batch()
    probe = _SavedWeights(engine.modules)
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, probe.unpack):
        loss = engine.forward_backward(lambda micro, shard, n: (x, y))
    layer = next(iter(engine.modules[0].layers.values()))
    policy = layer._get_fsdp_state()._mp_policy.param_dtype if isinstance(layer, FSDPModule) else None
    return {
        "loss": float(loss.detach()),
        "grads": engine.gather_grads(),
        "weights_at_backward": probe.at_backward,
        "weights_peak": probe.peak,
        "weight_bytes": probe.weight_bytes,  # every 2-D weight of the stages in bf16
        "block_unit_dtype": policy,
        "site_dtypes": {p.dtype for p in layer.attn_conn.parameters()},
    }


def _one_process(precision: str) -> tuple[float, dict]:
    from mhc_train.model import build_model, lm_loss

    cfg = _cfg("1f1b", precision, 2)
    model = build_model(cfg.model, cfg.connection, seed=0)
    x, y = _batch()
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    loss = lm_loss(logits, y)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    store = torch.distributed.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("schedule,microbatches", [("1f1b", 2), ("zbv", 4)])
def test_bf16_stages_hold_no_weight_copy_for_backward_and_match_one_process(one_rank, schedule, microbatches):
    got = _step(schedule, "bf16", microbatches)
    assert got["block_unit_dtype"] == torch.bfloat16 and got["site_dtypes"] == {torch.float32}, got
    if schedule == "1f1b":  # units resharded after each forward and backward (a split backward keeps them to W)
        assert got["weights_at_backward"] == 0, got  # main: 425,984 bytes of autocast copies
        assert got["weights_peak"] < got["weight_bytes"] // 4, got  # measured 106,496 (main: 425,984 of 655,360)
    loss, grads = _one_process("bf16")
    assert abs(got["loss"] - loss) <= 5e-2 * abs(loss), (got["loss"], loss)
    assert got["grads"].keys() == grads.keys()
    for name, g in grads.items():  # bf16 gathers round the embedding and norms too (test_recompute_fsdp.py)
        torch.testing.assert_close(got["grads"][name], g, rtol=5e-2, atol=5e-3)


def test_fp32_pipeline_is_not_sharded_at_dp1(one_rank):
    got = _step("1f1b", "fp32")
    assert got["block_unit_dtype"] is None, got
    loss, grads = _one_process("fp32")
    assert abs(got["loss"] - loss) <= 1e-5 * loss, (got["loss"], loss)


def test_last_stage_loss_is_chunked(one_rank, monkeypatch):
    """Forced into chunks of 8 tokens: the head's largest input is one chunk, and the loss equals the one-chunk
    loss."""
    from mhc_train.model import transformer

    whole = _step("1f1b", "fp32")["loss"]
    rows = []
    forward = torch.nn.Linear.forward

    def spy(self, h):
        if self.out_features == 512:  # the LM head (vocab 512)
            rows.append(h.reshape(-1, h.shape[-1]).shape[0])
        return forward(self, h)

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    monkeypatch.setattr(transformer, "LOSS_CHUNK_ELEMENTS", 8 * 512)
    chunked = _step("1f1b", "fp32")["loss"]
    assert rows and max(rows) == 8, rows  # main: 32 rows (a micro-batch of 2 x 16 tokens) at once
    assert abs(chunked - whole) <= 1e-6 * whole, (chunked, whole)
