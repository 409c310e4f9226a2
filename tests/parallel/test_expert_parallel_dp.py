"""Expert parallelism below the data-parallel size (parallel/expert_layout.py): the experts Shard(0) over an ep
sub-mesh carved from dp_shard and FSDP2-sharded over the rest, the other parameters FSDP over all of dp.

- Fast (fake process group, no launch): at world 8 with 8 experts, FSDP8 / ep 4 and HSDP 2 x 4 / ep 2, each rank
  holds its slice of each stacked expert weight (which: its ep and dp_mod_ep coordinates), its expert group is ep
  neighbouring ranks, the other parameters are sharded over all 8; `mhc-train plan` at ep < dp counts the expert
  bytes a rank stores and gathers. Every refusal of `validate_ep` names its fix on one line.
- Slow (4 gloo ranks, one torchrun launch of this file's worker): ep = 2 inside dp = 4 equals one process loss for
  loss, gradient for gradient, pre-clip norm for norm, the balancing bias and the weights after 3 steps, residual
  and mHC (`moe_test`); a DCP checkpoint written at ep = 2 after 2 steps resumes at ep = 4 (dp = 4) and in one
  process, and the third step's loss equals the uninterrupted run's. MHC_TRAIN_MATRIX_FULL=1 (make test-matrix) adds HSDP 2 x 2 with ep = 2 (the
  experts replicated over dp_replicate) in the same launch.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mhc_train.config import ConfigError
from tests.support import launch
from tests.support.numerics import assert_ep_run_matches

STEPS = 3
FULL = os.environ.get("MHC_TRAIN_MATRIX_FULL", "") not in ("", "0")  # make test-matrix


# ---- fast: the layout under the fake process group -----------------------------------------------------------------
def _fake_sharded(world: int, rank: int, ep: int, replicate: int):
    """Rank `rank`'s FSDP-sharded MoE model (8 experts) on meta, and its build context (under a fake group)."""
    from mhc_train.config import load_config
    from mhc_train.model import build_model
    from mhc_train.parallel.build import build_context, sharded_modules
    from mhc_train.parallel.dist import DistInfo

    over = ["model=moe_test", "train=test", "parallel=ep", f"parallel.ep={ep}", "model.moe.n_routed_experts=8",
            f"parallel.dp_replicate={replicate}", "train.device=cpu", f"train.batch_size={world}"]  # fmt: skip
    cfg = load_config(over)
    ctx = build_context(cfg, DistInfo(rank=rank, world=world))
    model = build_model(cfg.model, cfg.connection, device="meta")
    (sharded,), _ = sharded_modules(model, ctx)
    return sharded, ctx


@pytest.mark.parametrize("replicate,ep", [(1, 4), (2, 2)], ids=["fsdp8-ep4", "hsdp2x4-ep2"])
def test_ep_below_dp_lays_experts_on_a_sub_mesh_and_fsdp_over_the_rest(replicate, ep):
    """World 8, 8 experts: the experts' mesh splits dp_shard (S = 8 / replicate) into (S / ep, ep), ep innermost;
    rank r holds 8 / S rows of each stacked weight, from expert (r % ep) * (8 / ep) + (r % S) // ep * (8 / S) on (its
    ep coordinate picks the group's block, its dp_mod_ep coordinate a slice of it; under HSDP both replicas hold the
    same), while a non-expert weight is sharded over the whole data-parallel mesh. (The parameter's own mesh coordinates are not
    checked: several fake process groups in one process leave torch's sliced meshes at rank 0's.)"""
    from torch.distributed.tensor import DTensor

    from mhc_train.plan.layout import fake_group

    world, S = 8, 8 // replicate
    for rank in (0, 5, 7):
        with fake_group(world, rank):
            model, ctx = _fake_sharded(world, rank, ep, replicate)
            w1 = model.layers["1"].ffn.experts.w1
            names = ("dp_replicate",) * (replicate > 1) + ("dp_mod_ep", "ep")
            assert isinstance(w1, DTensor) and w1.device_mesh.mesh_dim_names == names, w1.device_mesh
            rows = 8 // S  # 8 experts / ep / (S / ep)
            assert tuple(w1.shape) == (8, 32, 16) and tuple(w1.to_local().shape) == (rows, 32, 16), w1.to_local().shape
            ep_mesh, fsdp_mesh = ctx.mesh.expert_meshes()
            first = rank - rank % ep
            assert ep_mesh.mesh.tolist() == list(range(first, first + ep)), ep_mesh.mesh  # neighbouring ranks
            assert fsdp_mesh.size() == world // ep and rank in fsdp_mesh.mesh.flatten().tolist(), fsdp_mesh.mesh
            # which experts: the ep coordinate picks the group's block of 8 / ep, the dp_mod_ep coordinate a slice
            assert ep_mesh.get_local_rank() == rank % ep, ep_mesh.get_coordinate()
            assert fsdp_mesh.get_coordinate()[-1] == (rank % S) // ep, fsdp_mesh.get_coordinate()
            gate = model.layers["1"].ffn.gate.weight  # a non-expert weight: FSDP / HSDP over all 8 ranks
            assert gate.device_mesh.size() == world, gate.device_mesh


def test_experts_unit_gathers_in_the_compute_dtype_like_the_blocks():
    """Under bf16 the experts' own FSDP unit (ep below dp) gathers bf16 weights and reduces in fp32, as the blocks'
    units do (in fp32 it would move twice the bytes of most of an MoE model's parameters)."""
    import dataclasses

    from mhc_train.parallel.fsdp import shard
    from mhc_train.plan.layout import fake_group

    with fake_group(8, 0):
        model, ctx = _fake_sharded(8, 0, 2, 1)  # fp32 on CPU: the units gather fp32
        policy = model.layers["1"].ffn.experts._get_fsdp_state()._mp_policy
        assert policy.param_dtype in (None, torch.float32), policy
    with fake_group(8, 0):
        from mhc_train.config import load_config
        from mhc_train.model import build_model
        from mhc_train.parallel.build import apply_ep, build_context
        from mhc_train.parallel.dist import DistInfo

        cfg = load_config(["model=moe_test", "train=test", "parallel=ep", "parallel.ep=2", "train.batch_size=8",
                           "model.moe.n_routed_experts=8", "train.device=cpu"])  # fmt: skip
        ctx = dataclasses.replace(build_context(cfg, DistInfo(rank=0, world=8)), amp=torch.bfloat16)
        model = build_model(cfg.model, cfg.connection, device="meta")
        apply_ep(model, ctx)
        shard(model, ctx.mesh.dp_mesh(), per_block=True, compute_dtype=torch.bfloat16)
        experts, block = model.layers["1"].ffn.experts, model.layers["1"]
        for unit in (experts, block):
            policy = unit._get_fsdp_state()._mp_policy
            assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32), (unit, policy)


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


def test_ep_refusals_name_the_fix():
    """ep below dp (also under HSDP) is accepted; what still does not work is refused with one line naming the fix
    (the engine, experts-divisibility and DeepSpeed refusals: tests/model/test_moe.py)."""
    from mhc_train.config import load_config
    from mhc_train.config.validate import validate_ep

    cfg = load_config(["model=moe_test", "train=test", "parallel=ep", "parallel.ep=2"])
    for world, replicate in ((2, 1), (4, 1), (8, 1), (4, 2), (8, 2)):
        cfg.parallel.dp_replicate = replicate
        validate_ep(cfg, world)
    refused = [
        ({"dp_replicate": 1}, 3, "must divide the data-parallel size \\(3 ranks launched\\)"),
        ({"dp_replicate": 2}, 6, "must divide the data-parallel size \\(6 ranks / dp_replicate=2\\)"),
        ({"dp_replicate": 1, "pp": 2}, 8, "must equal each stage's data-parallel size \\(8 ranks / pp=2\\)"),
        ({"dp_replicate": 2, "pp": 2}, 8, "runs in pipeline stages without dp_replicate so far"),
    ]
    for parallel, world, match in refused:
        for key, value in parallel.items():
            setattr(cfg.parallel, key, value)
        with pytest.raises(ConfigError, match=match) as e:
            validate_ep(cfg, world)
        assert "\n" not in str(e.value)
    cfg.parallel.pp, cfg.parallel.dp_replicate, cfg.model.ffn = 1, 1, "dense"
    with pytest.raises(ConfigError, match="set model.ffn=moe, or ep=1"):
        validate_ep(cfg, 4)


# ---- slow: numerics on 4 gloo ranks --------------------------------------------------------------------------------
@pytest.mark.slow
def test_ep2_in_dp4_equals_one_process_and_dcp_resumes_across_layouts():
    cases = ["hsdp"] if FULL else []  # HSDP 2 x 2 with ep = 2: a third 4-rank layout, make test-matrix only
    out = launch.run(launch.torchrun_cmd(cases, nproc=4, module="tests.parallel.test_expert_parallel_dp"), timeout=600)
    assert out.count("EP_DP_MATCH") == 2 + len(cases), out[-3000:]
    assert "EP_DP_RESUME ep4 ok" in out and "EP_DP_RESUME one ok" in out, out[-3000:]


def _build(ep: int, arm: str, dist, replicate: int = 1):
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine
    from tests.parallel.test_expert_parallel import _config

    cfg = _config(ep, arm)
    cfg.parallel.dp_replicate = replicate
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
    grads["pre-clip norm"] = torch.as_tensor(float(engine.step()))  # the clip over both meshes counts each once
    return loss, grads


def _resume(ep: int, arm: str, dist, directory, scheduler: dict) -> float:
    """Step 3's loss of a run at `ep` (dist: 4 ranks, or one process where dist.world == 1) loaded from the DCP
    checkpoint in `directory`."""
    import torch.distributed.checkpoint as dcp

    engine = _build(ep, arm, dist)
    dcp.load(engine.live_state(), checkpoint_id=str(directory), no_dist=dist.world == 1)
    engine.weights_loaded()
    engine.scheduler.load_state_dict(scheduler)
    return _step(engine, STEPS - 1, dist)[0]


def _train(engine, dist, checkpoint=None) -> tuple[list[float], list[dict], dict, dict | None]:
    """STEPS steps: (losses, gathered gradients, full state after, the scheduler's state where a DCP checkpoint was
    written to `checkpoint` before the last step)."""
    from mhc_train.checkpoint.formats import save_dcp

    losses, grads, scheduler = [], [], None
    for step in range(STEPS):
        if step == STEPS - 1 and checkpoint is not None:
            save_dcp(engine.live_state(), checkpoint)
            scheduler = engine.scheduler.state_dict()
        loss, g = _step(engine, step, dist)
        losses.append(loss)
        grads.append(g)
    return losses, grads, engine.full_model().state_dict(), scheduler


def main() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import DistInfo, broadcast_from_main, shutdown

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    tmp = Path(broadcast_from_main(tempfile.mkdtemp() if dist.is_main else None, dist))
    want, scheduler = {}, None
    layouts = [("residual", 1), ("mhc", 1)] + ([("mhc", 2)] if "hsdp" in sys.argv[1:] else [])  # 2: HSDP 2 x 2
    for arm, replicate in layouts:
        engine = _build(2, arm, dist, replicate)
        w1 = engine.train_model.layers["1"].ffn.experts.w1
        names = ("dp_replicate", "dp_mod_ep", "ep") if replicate > 1 else ("dp_mod_ep", "ep")
        assert w1.device_mesh.mesh_dim_names == names, w1.device_mesh
        assert w1.to_local().shape[0] == (2 if replicate > 1 else 1), w1.to_local().shape  # 4 experts / ep / dp_mod_ep
        got = _train(engine, dist, tmp / "ckpt" if (arm, replicate) == ("mhc", 1) else None)
        scheduler = got[3] or scheduler
        if dist.is_main:
            want[arm] = want.get(arm) or _train(_build(1, arm, DistInfo()), DistInfo())
            assert_ep_run_matches(arm, got, want[arm])
            print(f"EP_DP_MATCH {arm} dp_replicate={replicate}: losses {got[0]}", flush=True)
    last = want["mhc"][0][-1] if dist.is_main else None
    resumed = _resume(4, "mhc", dist, tmp / "ckpt", scheduler)
    if dist.is_main:
        assert abs(resumed - last) < 1e-5 * abs(last), (resumed, last)
        print("EP_DP_RESUME ep4 ok", flush=True)
        resumed = _resume(1, "mhc", DistInfo(), tmp / "ckpt", scheduler)
        assert abs(resumed - last) < 1e-5 * abs(last), (resumed, last)
        print("EP_DP_RESUME one ok", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    shutdown()


if __name__ == "__main__":
    main()
