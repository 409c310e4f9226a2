"""Expert parallelism inside pipeline stages (parallel.pp=2, parallel.ep=2: 4 ranks, 2 stages x 2 data-parallel
ranks, the experts Shard(0) over each stage's data-parallel mesh and left out of FSDP's units).

- Fast (fake process group, no communication): every rank's layout, which parameters are DTensors on which mesh, and
  how many experts each rank holds; the config's refusal of an ep other than the stage's data-parallel size.
- Slow (one torchrun launch of 4 gloo ranks, the worker at the bottom): 1F1B (residual) and DualPipeV (mHC,
  recompute=mhc, the expert all-to-all interleaved with the other micro-batch's compute in the overlapped pairs)
  equal one process loss for loss over STEPS steps, and so do the balancing bias and the weights after them; the
  DualPipeV run's gradients are bit-identical to the same run without the interleaving (torch's in-order
  OVERLAP_F_B), and its issue trace shows each all-to-all posted before the other half's compute chunk and waited
  after it. One launch: 20 s on the shared 2-core machine at load 4 (test_expert_parallel's 2 ranks: 14 s beside it).
"""

from __future__ import annotations

import pytest
import torch

from tests.support import launch

STEPS = 2


def _config(arm: str, schedule: str, ep: int = 2, pp: int = 2, overlap: bool = True, **extra):
    from mhc_train.config import load_config

    over = ["model=moe_test", "train=test", f"connection={arm}", "train.precision=fp32", "train.device=cpu",
            "train.batch_size=8", "train.seq_len=8", "model.n_layer=4", "optim.grad_clip=0",
            "model.moe.bias_update_rate=0.01", "logging.wandb=false"]  # fmt: skip
    if pp > 1:
        recompute = "mhc" if arm == "mhc" else "none"
        over += ["parallel.engine=fsdp", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.pp_schedule={schedule}",
                 f"parallel.pp_overlap={str(overlap).lower()}", f"parallel.recompute={recompute}",
                 "parallel.recompute_block=stage"]  # fmt: skip
    over += [f"{k}={v}" for k, v in extra.items()]
    return load_config(over)


# ---- fast: the layout under torch's fake process group ------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_pp_ep_layout_on_a_fake_group(schedule):
    from torch.distributed.tensor import DTensor, Shard

    from mhc_train.model.transformer import Transformer
    from mhc_train.parallel.build import BuildContext, sharded_modules
    from mhc_train.parallel.dist import DistInfo
    from mhc_train.parallel.expert_parallel import AllToAllDispatch
    from mhc_train.parallel.fsdp import replicated_params
    from mhc_train.parallel.mesh import build_mesh
    from mhc_train.plan.layout import fake_group

    cfg = _config("mhc", schedule)
    E = cfg.model.moe.n_routed_experts
    for rank in (0, 3):
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.connection)
        with fake_group(4, rank):
            info = DistInfo(rank, 4, 0, torch.device("cpu"))
            ctx = BuildContext(cfg, info, build_mesh(cfg, info), None)
            modules, plan = sharded_modules(model, ctx)
            want = {"1f1b": [[0], [1]], "dualpipev": [[0, 3], [1, 2]]}[schedule][ctx.mesh.pp_rank]
            assert plan.stage_ids == want and ctx.mesh.dp == 2
            n_moe = 0
            for m in modules:
                replicated = {id(q) for q in replicated_params([m])}  # recompute=mhc: the sites and norms (fsdp.py)
                for name, p in m.named_parameters():
                    if id(p) in replicated:
                        assert ".ffn.experts." not in name, name
                        continue
                    assert isinstance(p, DTensor) and p.device_mesh.size() == 2, name  # nothing on the pp dim
                    if ".ffn.experts." in name:  # the experts: E / ep whole experts, not an FSDP shard of them
                        assert p.placements == (Shard(0),) and p.to_local().shape[0] == E // 2, name
                        n_moe += name.endswith("w1")
                for name, mod in m.named_modules():
                    if name.endswith(".ffn") and hasattr(mod, "experts"):
                        assert isinstance(mod._dispatcher, AllToAllDispatch), name
                        fsdp_params = {id(q) for q in mod.experts.parameters()}
                        state = m._get_fsdp_state()._fsdp_param_group
                        assert state is None or not fsdp_params & {id(fp.sharded_param) for fp in state.fsdp_params}
            layers = [int(k) for mod in modules for k in mod.layers]
            assert n_moe == sum(1 for i in layers if i >= cfg.model.moe.first_k_dense), (n_moe, layers)


def test_pp_ep_refuses_an_ep_other_than_the_stage_data_parallel_size():
    from mhc_train.config import ConfigError
    from mhc_train.config.validate import validate_world

    cfg = _config("residual", "1f1b")
    validate_world(cfg, 4)
    with pytest.raises(ConfigError, match="ep=4") as e:
        validate_world(cfg, 8)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="tp=1"):
        from mhc_train.config.validate import validate_pp_ep

        cfg.parallel.tp = 2
        validate_pp_ep(cfg, 8)


# ---- slow: 4 gloo ranks against one process -----------------------------------------------------------------------
@pytest.mark.slow
def test_pp2_ep2_equals_one_process_and_dualpipev_hides_the_all_to_all():
    out = launch.run(launch.torchrun_cmd([], nproc=4, module="tests.parallel.test_pipeline_ep"), timeout=900)
    assert out.count("PP_EP_MATCH") == 2, out[-3000:]
    assert "PP_EP_TRACE ok" in out and "PP_EP_BITWISE ok" in out, out[-3000:]


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (8, 9), generator=gen) for _ in range(STEPS)]


def _run(cfg, dist, keep_grads: bool = False):
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine

    distributed = cfg.parallel.pp > 1
    model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if distributed else "cpu")
    engine = build_engine(model, cfg, dist)
    losses, grads = [], []
    for tokens in _batches():

        def batch(micro, shard, n_shards, tokens=tokens):
            per = tokens.shape[0] // n_shards
            rows = tokens[shard * per : (shard + 1) * per]
            return rows[:, :-1], rows[:, 1:]

        losses.append(float(engine.forward_backward(batch)))
        if keep_grads:
            grads.append({n: p.grad.detach().clone() for p, n in engine.param_names().items() if p.grad is not None})
        engine.step()
    state = engine.full_model().state_dict() if dist.is_main or distributed else {}
    return losses, grads, state, engine


def _check_trace(events) -> int:
    """Each all-to-all posted inside an interleaved pair is waited only after the other half ran a compute chunk
    (unless that half had already finished); returns how many were hidden."""
    hidden = 0
    for i, ev in enumerate(events):
        if ev[0] != "POST":
            continue
        half = ev[1]
        j = next(j for j in range(i + 1, len(events)) if events[j][0] == "WAIT" and events[j][1:] == ev[1:])
        between = events[i + 1 : j]
        other_ran = any(e[0] == "RUN" and e[1] != half for e in between)
        other_done = any(e[0] == "DONE" and e[1] != half and e[2] == ev[2] for e in events[:i])  # in this pair
        assert other_ran or other_done, (i, ev, between)
        hidden += other_ran
    return hidden


def main() -> None:
    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import DistInfo, shutdown

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    for arm, schedule in (("residual", "1f1b"), ("mhc", "dualpipev")):
        got = _run(_config(arm, schedule), dist, keep_grads=schedule == "dualpipev")
        if schedule == "dualpipev":  # the interleaved pairs: bit-identical to torch's in-order pairs, and the trace
            plain = _run(_config(arm, schedule, overlap=False), dist, keep_grads=True)
            assert got[0] == plain[0], (got[0], plain[0])
            for a, b in zip(got[1], plain[1]):
                for p in a:
                    assert torch.equal(a[p].to_local() if hasattr(a[p], "to_local") else a[p],
                                       b[p].to_local() if hasattr(b[p], "to_local") else b[p]), p  # fmt: skip
            events = got[3].overlap.a2a_events
            hidden = _check_trace(events)
            assert hidden > 0, events
            if dist.rank >= 2:  # stages 1 and 2, both MoE: every all-to-all of theirs hides behind the other half
                assert hidden == sum(e[0] == "POST" for e in events), events
                tags = [e[5] for e in events if e[0] == "POST" and e[2] == events[0][2]]  # the first pair's
                assert tags == ["dispatch_counts", "combine_bwd", "dispatch", "dispatch_bwd", "combine"], tags
            if dist.is_main:
                print("PP_EP_BITWISE ok", flush=True)
                print(f"PP_EP_TRACE ok: {hidden} all-to-alls hidden behind the other half", flush=True)
        if dist.is_main:
            want = _run(_config(arm, schedule, pp=1), DistInfo())
            for a, b in zip(got[0], want[0]):
                assert abs(a - b) < 1e-5 * abs(b), (arm, got[0], want[0])
            for k in want[2]:
                if k.endswith("expert_bias"):
                    assert torch.equal(got[2][k], want[2][k]), (k, got[2][k], want[2][k])
                torch.testing.assert_close(got[2][k], want[2][k], rtol=0, atol=1e-4, msg=k)
            assert any(want[2][k].abs().max() > 0 for k in want[2] if k.endswith("expert_bias"))
            print(f"PP_EP_MATCH {arm} {schedule}: losses {got[0]}", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
