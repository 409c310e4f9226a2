"""Expert parallelism below the data-parallel size (parallel/expert_layout.py): the experts Shard(0) over an ep
sub-mesh carved from dp_shard and FSDP2-sharded over the rest, the other parameters FSDP over all of dp.

- Fast (fake process group, no launch): at world 8 / ep 4 (8 experts) each rank holds 1 expert row of each stacked
  weight, its expert group is the 4 neighbouring ranks, the other parameters are sharded over all 8, and the ranks of
  an expert group hold disjoint experts while the two groups hold the same ones; `mhc-train plan` at ep < dp counts
  those expert bytes. Every refusal of `validate_ep` names its fix on one line.
- Slow (4 gloo ranks, one torchrun launch of this file's worker): ep = 2 inside dp = 4 equals one process loss for
  loss, gradient for gradient, the balancing bias and the weights after 3 steps, residual and mHC (`moe_test`); a
  DCP checkpoint written at ep = 2 after 2 steps resumes at ep = 4 (dp = 4) and in one process, and the third step's
  loss equals the uninterrupted run's.
"""

from __future__ import annotations

import pytest
import torch

from mhc_train.config import ConfigError
from tests.support import launch

STEPS = 3


# ---- fast: the layout under the fake process group -----------------------------------------------------------------
def _fake_engine_parts(world: int, rank: int, ep: int, experts: int):
    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.parallel.build import build_context, sharded_modules
    from mhc_train.parallel.dist import DistInfo

    over = ["model=moe_test", "train=test", "parallel=ep", f"parallel.ep={ep}", f"model.moe.n_routed_experts={experts}",
            "train.device=cpu", f"train.batch_size={world}"]  # fmt: skip
    cfg = load_config(over)
    ctx = build_context(cfg, DistInfo(rank=rank, world=world))
    model = build_model(cfg.model, cfg.connection, device="meta")
    (sharded,), _ = sharded_modules(model, ctx)
    return sharded, ctx


def test_ep4_in_dp8_lays_experts_on_a_sub_mesh_and_fsdp_over_the_rest():
    from torch.distributed.tensor import DTensor

    from mhc_train.plan.layout import fake_group

    world, ep = 8, 4
    for rank in (0, 5):
        with fake_group(world, rank):
            model, ctx = _fake_engine_parts(world, rank, ep, experts=8)
            w1 = model.layers["1"].ffn.experts.w1
            assert isinstance(w1, DTensor) and tuple(w1.shape) == (8, 32, 16), w1
            assert tuple(w1.to_local().shape) == (1, 32, 16), w1.to_local().shape  # 8 experts / ep 4 / (dp / ep) 2
            names = w1.device_mesh.mesh_dim_names
            assert names == ("dp_mod_ep", "ep"), names
            ep_mesh, fsdp_mesh = ctx.mesh.expert_meshes()
            assert ep_mesh.mesh.tolist() == [4 * (rank // 4) + i for i in range(4)], ep_mesh.mesh
            assert fsdp_mesh.mesh.tolist() == [rank % 4, rank % 4 + 4], fsdp_mesh.mesh
            gate = model.layers["1"].ffn.gate.weight  # a non-expert weight: FSDP over all 8 ranks
            assert gate.device_mesh.mesh_dim_names == ("dp_shard",) and gate.device_mesh.size() == world
            assert ep_mesh.get_local_rank() == rank % 4 and fsdp_mesh.get_local_rank() == rank // 4


def test_plan_accepts_ep_below_dp_and_counts_expert_bytes_per_rank():
    """At world 8 with 8 experts of [C=32, H=16] (3 stacked weights): ep = 2 gathers 4 experts per FSDP unit, ep = 8
    one (no FSDP of the experts); either way a rank stores 1/8 of them."""
    from mhc_train.config import load_config
    from mhc_train.plan.estimate import describe
    from mhc_train.plan.layout import rank_layout

    base = ["model=moe_test", "train=gpu", "train.seq_len=64", "parallel=ep", "train.batch_size=8",
            "model.moe.n_routed_experts=8"]  # fmt: skip
    expert = 3 * 32 * 16
    half = load_config([*base, "parallel.ep=2"])
    lay = rank_layout(half, 8, 0, None)  # ep 2 inside dp 8
    engine = describe(half, lay, 8, 0)
    assert "ep=2: 4 of 8 experts per expert group rank, FSDP over dp/ep=4" in engine, engine
    assert (4 * expert, torch.float32) in lay.units, lay.units  # the experts' own unit gathers E / ep experts
    whole = rank_layout(load_config([*base, "parallel.ep=8"]), 8, 0, None)
    assert lay.held_numel == whole.held_numel, (lay.held_numel, whole.held_numel)  # 1 of 8 experts stored either way


def test_ep_refusals_below_dp_name_the_fix():
    from mhc_train.config import load_config
    from mhc_train.config.validate import validate_ep

    cfg = load_config(["model=moe_test", "train=test", "parallel=ep", "parallel.ep=2"])
    validate_ep(cfg, 4)  # ep below dp: accepted
    validate_ep(cfg, 2)
    for world, match in ((3, "must divide the data-parallel size"),):
        with pytest.raises(ConfigError, match=match) as e:
            validate_ep(cfg, world)
        assert "\n" not in str(e.value)


# ---- slow: numerics on 4 gloo ranks --------------------------------------------------------------------------------
@pytest.mark.slow
def test_ep2_in_dp4_equals_one_process_and_dcp_resumes_across_layouts():
    out = launch.run(launch.torchrun_cmd([], nproc=4, module="tests.parallel.test_expert_parallel_dp"), timeout=600)
    assert out.count("EP_DP_MATCH") == 2, out[-3000:]
    assert "EP_DP_RESUME ep4 ok" in out and "EP_DP_RESUME one ok" in out, out[-3000:]


def _build(ep: int, arm: str, dist):
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine
    from tests.parallel.test_expert_parallel import _config

    cfg = _config(ep, arm)
    model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if ep > 1 else "cpu")
    return build_engine(model, cfg, dist)


def _step(engine, step: int, dist) -> tuple[float, dict]:
    gen = torch.Generator().manual_seed(7)
    for _ in range(step + 1):  # the same batch for step i in every layout
        tokens = torch.randint(0, 512, (4, 17), generator=gen)

    def batch(micro, shard, n_shards):
        per = tokens.shape[0] // n_shards
        rows = tokens[shard * per : (shard + 1) * per]
        return rows[:, :-1], rows[:, 1:]

    loss = float(engine.forward_backward(batch))
    grads = engine.gather_grads()
    engine.step()
    return loss, grads


def _compare(arm: str, got, want) -> None:
    for a, b in zip(got[0], want[0]):
        assert abs(a - b) < 1e-5 * abs(b), (arm, got[0], want[0])
    for step, (ga, gb) in enumerate(zip(got[1], want[1])):
        assert ga.keys() == gb.keys(), (sorted(ga), sorted(gb))
        for k in gb:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=f"{arm} step {step} {k}")
    bias = "layers.1.ffn.expert_bias"
    assert got[2][bias].abs().max() > 0 and torch.equal(got[2][bias], want[2][bias]), (got[2][bias], want[2][bias])
    for k in want[2]:  # Adam turns float-order noise on near-zero gradients into lr-sized steps
        torch.testing.assert_close(got[2][k], want[2][k], rtol=0, atol=1e-4, msg=k)


def _resume(ep: int, arm: str, dist, directory, scheduler: dict) -> float:
    """Step 3's loss of a run at `ep` (dist: 4 ranks, or one process where dist.world == 1) loaded from the DCP
    checkpoint in `directory`."""
    import torch.distributed.checkpoint as dcp

    engine = _build(ep, arm, dist)
    dcp.load(engine.live_state(), checkpoint_id=str(directory), no_dist=dist.world == 1)
    engine.weights_loaded()
    engine.scheduler.load_state_dict(scheduler)
    return _step(engine, STEPS - 1, dist)[0]


def main() -> None:
    import tempfile
    from pathlib import Path

    from mhc_train.checkpoint.formats import save_dcp
    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import DistInfo, broadcast_from_main, shutdown

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    for arm in ("residual", "mhc"):
        engine = _build(2, arm, dist)
        w1 = engine.train_model.layers["1"].ffn.experts.w1  # 4 experts / ep 2 / (dp / ep) 2: one each
        assert tuple(w1.to_local().shape)[0] == 1 and w1.device_mesh.mesh_dim_names == ("dp_mod_ep", "ep"), w1
        losses, grads = [], []
        for step in range(STEPS):
            if step == STEPS - 1 and arm == "mhc":  # a DCP checkpoint after 2 steps
                tmp = broadcast_from_main(tempfile.mkdtemp() if dist.is_main else None, dist)
                save_dcp(engine.live_state(), Path(tmp))
                scheduler = engine.scheduler.state_dict()
            loss, g = _step(engine, step, dist)
            losses.append(loss)
            grads.append(g)
        state = engine.full_model().state_dict()
        if dist.is_main:
            want = [[], [], {}]
            one = _build(1, arm, DistInfo())
            for step in range(STEPS):
                loss, g = _step(one, step, DistInfo())
                want[0].append(loss)
                want[1].append(g)
            want[2] = one.full_model().state_dict()
            _compare(arm, (losses, grads, state), want)
            print(f"EP_DP_MATCH {arm}: losses {losses}", flush=True)
    last = losses[-1]
    resumed = _resume(4, "mhc", dist, tmp, scheduler)
    assert abs(resumed - last) < 1e-5 * abs(last), (resumed, last)
    if dist.is_main:
        print("EP_DP_RESUME ep4 ok", flush=True)
        resumed = _resume(1, "mhc", DistInfo(), tmp, scheduler)
        assert abs(resumed - last) < 1e-5 * abs(last), (resumed, last)
        print("EP_DP_RESUME one ok", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
