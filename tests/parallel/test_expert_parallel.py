"""Expert parallelism (parallel.ep=2, FSDP2, 2 gloo ranks) equals one process: loss for loss, gradient for gradient
and the balancing bias, over 3 steps, for the residual and mHC arms, in one torchrun launch of this file (the worker
at the bottom). Each rank holds half the experts and exchanges tokens by all-to-all."""

from __future__ import annotations

import pytest
import torch

from tests.support import launch
from tests.support.numerics import assert_ep_run_matches

STEPS = 3


@pytest.mark.slow
def test_ep2_equals_one_process_residual_and_mhc():
    out = launch.run(launch.torchrun_cmd([], module="tests.parallel.test_expert_parallel"), timeout=600)
    assert out.count("EP_MATCH") == 2, out[-3000:]


# ---- the worker (under torchrun) ------------------------------------------------------------------------------------
def _config(ep: int, arm: str):
    from mhc_train.config import load_config

    over = ["model=moe_test", "train=test", f"connection={arm}", "train.precision=fp32", "train.device=cpu",
            "train.batch_size=4", "train.seq_len=16", "optim.grad_clip=0", "model.moe.bias_update_rate=0.01",
            "logging.wandb=false"]  # fmt: skip
    if ep > 1:
        over += ["parallel.engine=fsdp", f"parallel.ep={ep}"]
    return load_config(over)


def _run(ep: int, arm: str, dist) -> tuple[list[float], list[dict], dict]:
    from mhc_train.model import build_model
    from mhc_train.parallel import build_engine

    cfg = _config(ep, arm)
    model = build_model(cfg.model, cfg.connection, seed=0, device="meta" if ep > 1 else "cpu")
    engine = build_engine(model, cfg, dist)
    if ep > 1:  # each rank holds E / ep experts
        w1 = engine.train_model.layers["1"].ffn.experts.w1
        assert w1.to_local().shape[0] == cfg.model.moe.n_routed_experts // ep, w1.to_local().shape
    gen = torch.Generator().manual_seed(7)
    losses, grads = [], []
    for _ in range(STEPS):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, 17), generator=gen)

        def batch(micro, shard, n_shards, tokens=tokens):
            per = tokens.shape[0] // n_shards
            rows = tokens[shard * per : (shard + 1) * per]
            return rows[:, :-1], rows[:, 1:]

        losses.append(float(engine.forward_backward(batch)))
        grads.append(engine.gather_grads())
        engine.step()
    state = engine.full_model().state_dict() if dist.is_main or ep > 1 else {}
    return losses, grads, state


def main() -> None:
    from mhc_train.parallel import init_distributed
    from mhc_train.parallel.dist import DistInfo

    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    for arm in ("residual", "mhc"):
        got = _run(2, arm, dist)
        if dist.is_main:
            want = _run(1, arm, DistInfo())
            assert_ep_run_matches(arm, got, want)
            print(f"EP_MATCH {arm}: losses {got[0]}", flush=True)
    from mhc_train.parallel.dist import shutdown

    shutdown()


if __name__ == "__main__":
    main()
