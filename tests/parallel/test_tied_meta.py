"""A tied LM head (model.tie_embeddings) built on the meta device stays tied: `state.materialise` (ZeRO-1/2, pipeline
stages), rank 0's plain view (`engine.host_state` / `materialise_on_host`) and FSDP2's build (under torch's fake
process group, rank 0 of 2) keep `output.weight is tok_embeddings.weight` with the one-process values, and the
materialised model trains step for step as the one built in one process. (A pipeline refuses tied embeddings.)"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mhc_train.config import OptimConfig, load_config
from mhc_train.model import build_model
from mhc_train.model.transformer import Transformer
from mhc_train.optim import build_optimizer
from mhc_train.parallel import DistInfo, build_engine
from mhc_train.parallel.engine import host_state, materialise_on_host
from mhc_train.parallel.state import local, materialise
from tests.support.configs import conn_cfg, tiny_model_cfg


def _meta_model(cfg, conn):
    with torch.device("meta"):
        return Transformer(cfg, conn)


def _tied(model) -> bool:
    return model.output.weight is model.tok_embeddings.weight


def test_materialised_tied_head_stays_tied_and_trains_as_one_process():
    cfg, conn = tiny_model_cfg(tie_embeddings=True), conn_cfg("mhc")
    ref = build_model(cfg, conn, seed=3)
    model = _meta_model(cfg, conn)
    materialise(model, "cpu", 3)
    assert _tied(model) and len(list(model.parameters())) == len(list(ref.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    opts = [build_optimizer(m, OptimConfig(lr=1e-2)) for m in (ref, model)]
    for _ in range(2):
        for m, opt in zip((ref, model), opts):
            torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    assert _tied(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    from_weights = _meta_model(cfg, conn)  # a checkpoint's weights (a file resume)
    materialise(from_weights, "cpu", 0, weights=ref.state_dict())
    assert _tied(from_weights) and torch.equal(from_weights.output.weight, ref.output.weight)
    for fill in (host_state, lambda m: materialise_on_host(m, ref.state_dict())):  # rank 0's plain view
        view = _meta_model(cfg, conn)
        fill(view)
        assert _tied(view)


def test_fsdp_meta_build_keeps_the_tie():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    cfg = load_config(["model=test", "train=test", "connection=mhc", "model.tie_embeddings=true", "parallel=fsdp"])
    ref = build_model(cfg.model, cfg.connection, seed=cfg.train.seed)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = build_model(cfg.model, cfg.connection, seed=0, device="meta")
        trained = build_engine(model, cfg, DistInfo(rank=0, world=2)).train_model
        assert _tied(trained)
        rows = local(trained.output.weight).shape[0]  # rank 0's shard: the first rows
        assert torch.equal(local(trained.output.weight), ref.tok_embeddings.weight[:rows])
    finally:
        dist.destroy_process_group()
