"""What each rank holds once `build_engine` returns, at world 8 under torch's fake process group (no real
communication; every rank's build runs in this one process, one after another): the pipeline presets and FSDP / HSDP
hold their share of the parameters plus at most one block, the plain model stays on the meta device, and no pipeline
rank holds another stage's parameters. Plus the mesh's coordinates and the config rules of parallel.dp_replicate."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from mhc_train.config import ConfigError, load_config
from mhc_train.config.validate import validate_world
from mhc_train.model import build_model
from mhc_train.parallel import DistInfo, build_engine, builds_on_meta
from mhc_train.parallel.mesh import build_mesh
from mhc_train.parallel.schedules import layer_ranges, pipeline_layout
from mhc_train.parallel.state import local

WORLD = 8
# a block (~50k parameters) larger than the embedding or the head (16k each), so "one block" bounds any extra unit
SMALL = ["model=test", "train=test", "model.dim=64", "model.vocab_size=256", "connection=mhc", "train.batch_size=16"]
PRESETS = {
    "pp_1f1b": ["parallel=pp_1f1b", "parallel.pp=8", "model.n_layer=8"],
    "pp_dualpipev": ["parallel=pp_dualpipev", "parallel.pp=8", "model.n_layer=16"],
    "pp_fsdp": ["parallel=pp_fsdp", "parallel.pp=2", "model.n_layer=4"],
    "fsdp": ["parallel=fsdp", "model.n_layer=4"],
    "hsdp": ["parallel=fsdp", "parallel.dp_replicate=2", "model.n_layer=4"],
}


@contextlib.contextmanager
def fake_rank(rank: int, world: int = WORLD):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield DistInfo(rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def held_bytes(engine) -> int:
    """Bytes of every tensor the engine holds on this rank (this rank's shard of a DTensor), each storage once:
    the trained modules' parameters and buffers, the optimizer's state and the plain model's (unless on meta)."""
    seen, total = set(), 0
    tensors = [t for m in [*engine.live_modules(), engine.model] for t in [*m.parameters(), *m.buffers()]]
    tensors += [v for s in engine.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        t = local(t.detach())
        if t.device.type == "meta" or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def build(preset: str, rank: int):
    cfg = load_config([*SMALL, *PRESETS[preset]])
    validate_world(cfg, WORLD)
    with fake_rank(rank) as info:
        model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if builds_on_meta(cfg) else "cpu")
        engine = build_engine(model, cfg, info)
        return cfg, model, engine


def first_optimizer_step(engine) -> None:
    """Zero gradients and one optimizer step: AdamW allocates its two states per parameter (or shard) here."""
    for p in engine.train_parameters():
        p.grad = torch.zeros_like(p)
    engine.optimizer.step()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_rank_holds_its_share_plus_one_block_and_a_meta_plain_model(preset):
    for rank in (0, WORLD - 1):
        cfg, model, engine = build(preset, rank)
        assert all(p.device.type == "meta" for p in model.parameters()), f"{preset} rank {rank}: plain model held"
        total = sum(p.numel() * 4 for p in model.parameters())
        block = max(sum(p.numel() * 4 for p in layer.parameters()) for layer in model.layers.values())
        copies = WORLD // cfg.parallel.dp_replicate  # ranks over which one copy of the states is split (HSDP: 4)
        with fake_rank(rank):
            first_optimizer_step(engine)
        held = held_bytes(engine)  # parameters and AdamW's two states: 3 x the parameters' bytes
        assert held <= 3 * (total / copies + block), (
            f"{preset} rank {rank} holds {held:,} bytes; its share 3 x ({total / copies:,.0f} + one block {block:,})"
        )
        assert f"{sum(local(p).numel() for p in engine.train_parameters()):,} of" in engine.describe()


@pytest.mark.parametrize("preset", ["pp_1f1b", "pp_dualpipev", "pp_fsdp"])
def test_no_pipeline_rank_holds_another_stages_parameters(preset):
    cfg = load_config([*SMALL, *PRESETS[preset]])
    p = cfg.parallel
    n_stages, layout = pipeline_layout(p.pp_schedule, p.pp, p.pp_stages_per_rank, p.pp_schedule_csv)
    ranges = layer_ranges(cfg.model.n_layer, n_stages)
    dp = WORLD // p.pp
    for rank in range(0, WORLD, dp):  # one rank per pipeline position
        _, _, engine = build(preset, rank)
        mine = layout[rank // dp]
        want = {f"layers.{i}." for s in mine for i in ranges[s]}
        want |= {"tok_embeddings."} if 0 in mine else set()
        want |= {"norm.", "output."} if n_stages - 1 in mine else set()
        held = {n for m in [*engine.modules, engine.model] for n, p in m.named_parameters() if p.device.type != "meta"}
        prefixes = {n[: n.index(".", 7) + 1] if n.startswith("layers.") else n.split(".")[0] + "." for n in held}
        assert prefixes == want, (
            f"{preset} rank {rank}: holds {sorted(prefixes - want)}, lacks {sorted(want - prefixes)}"
        )


def test_mesh_coordinates_and_sizes():
    cfg = load_config(["model=test", "train=test", "parallel=pp_fsdp", "parallel.dp_replicate=2"])
    mesh = build_mesh(cfg, DistInfo(rank=13, world=16))  # pp 2 x dp_replicate 2 x dp_shard 4, no process group
    assert (mesh.pp, mesh.dp_replicate, mesh.dp_shard, mesh.dp, mesh.tp, mesh.cp) == (2, 2, 4, 8, 1, 1)
    assert mesh.coords == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 0, "tp": 0}
    assert (mesh.pp_rank, mesh.dp_rank) == (1, 5)
    assert mesh.describe() == "pp=2 x dp_replicate=2 x dp_shard=4"


def test_dp_replicate_rules():
    base = ["model=test", "train=test"]
    with pytest.raises(ConfigError, match="parallel.dp_replicate"):
        load_config([*base, "parallel.engine=ddp", "parallel.dp_replicate=2"])
    cfg = load_config([*base, "parallel.engine=fsdp", "parallel.dp_replicate=3"])
    with pytest.raises(ConfigError, match="parallel.dp_replicate"):
        validate_world(cfg, 4)
    validate_world(load_config([*base, "parallel.engine=fsdp", "parallel.dp_replicate=2"]), 4)
