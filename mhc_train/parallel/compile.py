"""`apply_compile(model)`: torch.compile each transformer block in place, one compiled region per block.

Why per block, not the whole model: the units every engine cuts the model into are blocks (an FSDP unit is a block
or a recompute block of them, a pipeline stage is a run of blocks), so a per-block region never spans a unit's
boundary, where FSDP gathers and frees parameters and a stage hands its activations on; one block compiles once and
every other block of the same shapes reuses its code (fast compiles at any depth); and it works the same on every
engine, the pipeline's stages included (each stage holds a `layers` dict of its own blocks).

Notable choices:
- `fullgraph=True` by default: a block has no graph break on either connection backend (the Triton kernels are
  `torch.library` ops, `mhc_train/ops/library.py`), so a break is a bug that should fail loudly, not a silent slowdown.
- In place (`nn.Module.compile`): parameter names, state dicts and checkpoints are unchanged (no `_orig_mod.` prefix).
- Embedding, final norm and LM head stay eager: they are outside the blocks and run once per step.
- Under recomputation (`model.block_runner` set, `parallel.recompute=mhc|full`) the runner calls each site's parts
  itself and never a block's `forward`: each block's F modules (`attn`, `ffn`) are compiled instead, the region
  recomputation leaves alone (F keeps its activations), and the connection work runs eager in the runner.
- Compile before sharding (torchtitan's order): FSDP2 wraps the compiled module's call, and a deep copy taken after
  compiling would still call the original module, so engines that copy the model compile their copy.
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, fullgraph: bool = True, **options) -> nn.Module:
    """Compile every block of `model.layers` in place (`block.compile(fullgraph=..., **options)`); returns `model`.

    `options` go to `torch.compile` (mode, backend, dynamic). A model without `layers` (not a transformer or a stage
    of one) is refused with a TypeError."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict | nn.ModuleList):
        raise TypeError(f"apply_compile: {type(model).__name__} has no `layers` of blocks to compile")
    blocks = layers.values() if isinstance(layers, nn.ModuleDict) else layers
    runner = getattr(model, "block_runner", None)
    for block in blocks:
        for region in (block,) if runner is None else (block.attn, block.ffn):
            region.compile(fullgraph=fullgraph, **options)
    return model
