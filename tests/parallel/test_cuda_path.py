"""What the CUDA path does differently, checked on CPU. FSDP2 mixed precision (fsdp.py note 3) in one process on a
1-rank gloo group: under bf16 the blocks' weights are gathered in bf16 and their gradients reduced in fp32, each
connection site is gathered in fp32 (the coefficient path never sees a rounded phi), the streams keep
model.stream_dtype, and the loss tracks the unsharded bf16 model. The process group a CUDA run joins."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from mhc_train.config import ConnectionConfig, ModelConfig
from mhc_train.model import build_model, lm_loss
from mhc_train.parallel.fsdp import shard

MODEL = ModelConfig(vocab_size=256, dim=32, n_layer=2, n_head=2, max_seq_len=32, init_std=0.2)


@pytest.fixture
def one_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arm", ["hc", "mhc"])
def test_bf16_gathers_keep_the_sites_and_the_streams_in_fp32(one_rank_group, arm):
    conn = ConnectionConfig(type=arm, n_streams=4, backend="torch", t_max=4)
    plain = build_model(MODEL, conn, seed=1)
    sharded = shard(copy.deepcopy(plain), one_rank_group, per_block=True, compute_dtype=torch.bfloat16)
    seen = {}

    def record(name, tensor_of):
        def hook(mod, args):  # returns None: the args go on unchanged
            seen.setdefault(name, tensor_of(mod, args).dtype)

        return hook

    block = sharded.layers["0"]
    block.attn.wq.register_forward_pre_hook(record("block weight", lambda m, a: m.weight))
    site_param = "phi" if arm == "mhc" else "static_alpha_r"
    block.attn_conn.register_forward_pre_hook(record("site weight", lambda m, a: getattr(m, site_param)))
    block.register_forward_pre_hook(record("stream", lambda m, a: a[0]))
    sharded.output.register_forward_pre_hook(record("head weight", lambda m, a: m.weight))

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(sharded(tokens), tokens)
        ref = lm_loss(plain(tokens), tokens)
    loss.backward()
    assert seen == {
        "block weight": torch.bfloat16,
        "site weight": torch.float32,
        "stream": torch.float32,
        "head weight": torch.bfloat16,
    }, seen
    assert abs(loss.item() - ref.item()) <= 2e-2 * ref.item(), (loss.item(), ref.item())
    grads = {n: p.grad for n, p in sharded.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())  # fp32 master gradients


def test_bf16_streams_stay_bf16_under_fsdp_mixed_precision(one_rank_group):
    model = build_model(dataclasses.replace(MODEL, stream_dtype="bf16"), ConnectionConfig(type="mhc", t_max=4))
    sharded = shard(model, one_rank_group, per_block=True, compute_dtype=torch.bfloat16)
    dtypes = []
    for layer in sharded.layers.values():
        layer.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sharded(torch.randint(0, 256, (1, 8)))
    assert dtypes == [torch.bfloat16] * 2


def test_one_unit_layouts_keep_fp32_gathers(one_rank_group):
    """Where the whole module is one unit (split-backward schedules) a bf16 gather would round phi:
    the weights stay fp32 (autocast still casts the GEMMs)."""
    model = build_model(MODEL, ConnectionConfig(type="mhc", t_max=4))
    sharded = shard(model, one_rank_group, per_block=False, compute_dtype=torch.bfloat16)
    seen = []
    sharded.layers["0"].attn.wq.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sharded(torch.randint(0, 256, (1, 8)))
    assert seen == [torch.float32]


def test_the_cuda_path_joins_a_group_that_serves_both_devices(monkeypatch):
    """On CUDA the default group is `cuda:nccl,cpu:gloo` (a CPU tensor reaching a collective goes through gloo instead
    of failing under NCCL), and the rank's device is cuda:LOCAL_RANK. Captured without a GPU."""
    from mhc_train.parallel import dist as pdist

    calls = {}
    monkeypatch.setattr(pdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(pdist.dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.update(device=i))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    info = pdist.init_distributed("cuda")
    assert calls.pop("timeout").total_seconds() == 1800, calls  # parallel.timeout_s's default (not torch's 10 min)
    assert calls == {"backend": "cuda:nccl,cpu:gloo", "device": 1}, calls
    assert info.device == torch.device("cuda", 1) and (info.rank, info.world) == (1, 2)
    assert pdist.process_group_backend("cpu") == "gloo"
