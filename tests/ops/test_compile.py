"""A connection site under torch.compile: no graph break in a block on either backend (the Triton kernels are
`torch.library` ops traced through their fakes, `mhc_train/ops/library.py`), and a model compiled per block
(`parallel.compile.apply_compile`, fullgraph) equals eager in its output and every gradient."""

from __future__ import annotations

import pytest
import torch

from mhc_train.model.transformer import build_model
from mhc_train.parallel.compile import apply_compile
from tests.support.configs import conn_cfg, tiny_model_cfg
from tests.support.numerics import assert_close


def _model(arm: str, backend: str = "torch", n_layer: int = 1):
    model = build_model(tiny_model_cfg(n_layer=n_layer), conn_cfg(arm, backend=backend, t_max=3))
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize(("backend", "arm"), [("torch", "mhc"), ("triton", "mhc"), ("triton", "hc")])
def test_a_block_traces_without_a_graph_break(backend, arm):
    """On triton the site's kernels (projection with its link slots, gates, pre, post_res) enter the graph as
    `mhc_train::` ops through their fake implementations; nothing runs. Today's autograd Functions with a Python
    link object break the graph at every site (and the interpreter's kernels cannot be traced at all)."""
    model = _model(arm, backend)
    block = model.layers["0"]
    torch._dynamo.reset()
    x = torch.randn(1, 8, model.n_streams, model.cfg.dim, requires_grad=True)
    explained = torch._dynamo.explain(block)(x, model.rope[:8])
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1
    if backend == "triton":
        graph = "\n".join(str(g.graph) for g in explained.graphs)
        for op in ("projection_linked", "pre_linked", "post_res_linked"):
            assert f"mhc_train.{op}" in graph, op


@pytest.mark.parametrize(("arm", "n_layer"), [("mhc", 2), ("hc", 1)])
def test_a_model_compiled_per_block_equals_eager(arm, n_layer):
    """apply_compile (fullgraph, in place) on a one-process model: same loss and gradients as eager, same parameter
    names (no `_orig_mod.`)."""
    torch._dynamo.reset()
    eager, compiled = _model(arm, n_layer=n_layer), _model(arm, n_layer=n_layer)
    names = [name for name, _ in compiled.named_parameters()]
    apply_compile(compiled, backend="aot_eager")
    assert [name for name, _ in compiled.named_parameters()] == names
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (eager, compiled):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0], atol=1e-6, what=f"{arm} loss")
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert_close(q.grad, p.grad, atol=1e-6, what=f"{arm} grad of {name}")


def test_apply_compile_refuses_a_module_without_blocks():
    with pytest.raises(TypeError, match="no `layers`"):
        apply_compile(torch.nn.Linear(2, 2))


def _single_pass(n_layer: int):
    cfg = conn_cfg("mhc", type="mhc_single_pass", numerics="deepseek_v4", backend="triton", t_max=3, phi_init_std=0.3)
    return build_model(tiny_model_cfg(n_layer=n_layer), cfg)


def test_a_single_pass_block_traces_without_a_graph_break():
    """The single-pass arm's read and write enter the graph as `mhc_train::` ops (ops/library_single_pass.py), linked
    through their slots; its autograd Functions (and the cross-site prefetch, off while compiling) would break it."""
    pytest.importorskip("triton")
    model = _single_pass(1)
    torch._dynamo.reset()
    x = torch.randn(1, 8, model.n_streams, model.cfg.dim, requires_grad=True)
    explained = torch._dynamo.explain(model.layers["0"])(x, model.rope[:8])
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    graph = "\n".join(str(g.graph) for g in explained.graphs)
    assert "mhc_train.sp_read" in graph and "mhc_train.sp_write_linked" in graph


def test_a_single_pass_model_compiled_per_block_equals_eager_bit_for_bit():
    """triton (interpreter) under aot_eager: the compiled blocks run the unfused custom ops, eager fuses across sites;
    the loss and every gradient are the same bits."""
    pytest.importorskip("triton")
    torch._dynamo.reset()
    eager, compiled = _single_pass(2), _single_pass(2)
    apply_compile(compiled, backend="aot_eager")
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (eager, compiled):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for (name, _), a, b in zip(eager.named_parameters(), results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b), name
