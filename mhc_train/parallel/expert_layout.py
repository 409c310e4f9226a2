"""Expert parallelism below the data-parallel size (torchtitan's layout): the experts Shard(0) over an ep sub-mesh
carved from dp_shard, FSDP2-sharded over what remains, while the other parameters stay FSDP over all of dp.

With dp_shard = 4 and ep = 2 the ranks split into (dp_mod_ep = 2, ep = 2) (`ParallelMesh.expert_meshes`): ranks
{0, 1} and {2, 3} are expert groups, each holding all E experts between them (E / ep each), and {0, 2}, {1, 3} hold
the same experts and shard them with FSDP2 (a unit of its own per MoE layer, before the blocks' units, which then
leave the experts out). The token all-to-all runs inside an expert group only (the unsharded weights' mesh is the
("ep",) sub-mesh: `AllToAllDispatch` reads its group from there).

Notable choices:
- Gradients: an expert's gradient arrives summed over the ep ranks whose tokens it served; FSDP's reduce-scatter then
  averages it over dp_mod_ep (and dp_replicate under HSDP), so dividing by ep makes it the global mean loss's
  gradient (`EP_GRAD_DIVISOR`, read by `expert_parallel.scale_expert_grads`); where ep equals dp_shard (no FSDP of
  the experts) the divisor stays the data-parallel size, as before.
- HSDP (dp_replicate > 1): the same, with the experts' FSDP mesh 2-D (dp_replicate, dp_mod_ep): replicated across
  the replicate groups, sharded inside each.
- FSDP2 shards the experts' stacked dim 0, which ep already shards: the parameter's layout is torch's
  `_StridedShard` over dp_mod_ep x `Shard(0)` over ep; DCP and `full_tensor` read it as the whole [E, ...] weight,
  so checkpoints move between layouts (ep = 2 at dp = 4, ep = 4 at dp = 4, one process).
- The layout rides on each experts module (`EP_LAYOUT`, set by `apply_ep`) so that FSDP's `shard` finds it on the
  copy it shards; a deep copy keeps the same layout object (it holds the process groups).
"""

from __future__ import annotations

import torch

EP_LAYOUT = "_mhc_ep_layout"  # the `ExpertLayout` on each experts module of an expert-parallel model
EP_GRAD_DIVISOR = "_mhc_ep_grad_divisor"  # set where FSDP2 averaged the experts' gradients over dp / ep


class ExpertLayout:
    """Where the experts of a model live: the `ParallelMesh` (its `expert_meshes`) and the ep size."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __deepcopy__(self, memo):
        return self  # process groups are not copied

    @property
    def ep(self) -> int:
        return self.mesh.ep

    @property
    def below_dp(self) -> bool:
        """Whether the experts need FSDP over the rest of dp (ep below dp_shard, or HSDP)."""
        return self.mesh.ep < self.mesh.dp_shard or self.mesh.dp_replicate > 1


def set_expert_layout(model: torch.nn.Module, mesh) -> None:
    """Record `mesh` (a `ParallelMesh`) on every MoE layer's experts of `model` (apply_ep)."""
    from mhc_train.model.moe import moe_modules

    layout = ExpertLayout(mesh)
    for _, m in moe_modules(model):
        setattr(m.experts, EP_LAYOUT, layout)


def ep_group(experts) -> tuple:
    """(the process group of the expert group `experts`' tokens are exchanged in, its size ep): the ("ep",) sub-mesh
    below dp, else the 1-D mesh of the expert weights (ep = dp_shard)."""
    layout = getattr(experts, EP_LAYOUT, None)
    if layout is not None and layout.below_dp:
        mesh = layout.mesh.expert_meshes()[0]
    else:
        mesh = experts.w1.device_mesh
    return mesh.get_group(), mesh.size()


def shard_experts_below_dp(moe, mark: str, compute_dtype=None) -> bool:
    """For an MoE layer whose layout is `below_dp`: its stacked expert weights as DTensors Shard(0) over the ("ep",)
    sub-mesh, then the experts module FSDP2-sharded over the rest of dp; marks the module `mark` (expert_parallel's
    EP_PARAM) and its gradient divisor (ep). Returns whether it took the layer (False: the ep = dp_shard path)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    experts = moe.experts
    layout = getattr(experts, EP_LAYOUT, None)
    if layout is None or not layout.below_dp:
        return False
    if getattr(experts, mark, False):
        return True
    ep_mesh, fsdp_mesh = layout.mesh.expert_meshes()
    for key, p in list(experts.named_parameters(recurse=False)):
        d = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
        setattr(experts, key, torch.nn.Parameter(d))
    policy = MixedPrecisionPolicy(compute_dtype or torch.float32, torch.float32, cast_forward_inputs=False)
    fully_shard(experts, mesh=fsdp_mesh, mp_policy=policy)  # bf16 gathers under bf16, as the blocks' units
    setattr(experts, mark, True)
    setattr(experts, EP_GRAD_DIVISOR, layout.ep)
    return True
