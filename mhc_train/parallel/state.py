"""Model and optimizer state by parameter name, whatever the layout: what makes a checkpoint load into one process,
DDP, FSDP at another world size or any pipeline layout.

- DTensor helpers: `local` (this rank's shard), `full` (the whole tensor, a collective), `shard_like` (a full
  tensor laid out like a parameter);
- the optimizer's state keyed by parameter name instead of position (`optimizer_state_by_name` and its loader);
- `live_state`: the live tensors a torch DCP save reads and a DCP load fills in place.
- `to_empty_tied`: `to_empty` off the meta device gives each name of a shared parameter (a tied LM head) its own
  tensor, so the head would train apart from the embedding: the names are re-tied to the first one. FSDP2's
  `to_empty` keeps the tie (the parameter objects survive); a pipeline never ties across stages (config refuses it).
"""

from __future__ import annotations

import torch


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, _dtensor_cls()) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathers a DTensor over its mesh (a collective: every rank of the mesh must call it)."""
    return t.full_tensor() if isinstance(t, _dtensor_cls()) else t


def shard_like(value, param: torch.Tensor):
    """A full tensor laid out like `param` (a DTensor shard of it when `param` is one); other values unchanged."""
    if isinstance(param, _dtensor_cls()) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value


def full_model_state(modules, keep: bool = True) -> dict:
    """{parameter/buffer name: full CPU tensor} over `modules` (a collective under FSDP: every rank calls it). Each
    tensor is gathered on its own, so a rank holds one full parameter on the device at a time; a rank with
    `keep=False` only takes part in the gathers and returns {}."""
    out = {}
    for m in modules:
        for k, v in m.state_dict().items():
            whole = full(v).detach()
            if keep:
                out[k] = whole.cpu()
    return out


def write_shard(param: torch.Tensor, value: torch.Tensor) -> None:
    """Put the full `value` into `param`: all of a plain tensor, this rank's shard of a DTensor. Every rank holds
    the same full value (drawn from the same seed, or read from the same file), so the shard is sliced locally and
    nothing is communicated."""
    if isinstance(param, _dtensor_cls()):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)  # fmt: skip
        param.to_local().copy_(part.to_local())
    else:
        param.copy_(value)


def _checkpoint_value(weights: dict, name: str, param: torch.Tensor) -> torch.Tensor:
    if name not in weights:
        raise KeyError(f"the checkpoint has no weights for {name}")
    if tuple(weights[name].shape) != tuple(param.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(weights[name].shape)}, model {tuple(param.shape)}")
    return weights[name]


@torch.no_grad()
def materialise(module: torch.nn.Module, device, seed: int, weights: dict | None = None) -> None:
    """Allocate a module built on the meta device on `device` and fill it: the initial values of `seed`, or the
    full tensors of `weights` (a plain state dict by name, from a checkpoint file), each rank writing what it holds."""
    to_empty_tied(module, device)
    if weights is None:
        module.init_weights(seed, write=write_shard)
        return
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(weights))
    if missing:
        raise KeyError(f"the checkpoint has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, p in params.items():
        write_shard(p, _checkpoint_value(weights, name, p))
    module.init_buffers()
    for name, b in module.named_buffers():  # state kept in buffers (the MoE balancing bias)
        if name in weights:
            b.copy_(weights[name])


def to_empty_tied(module: torch.nn.Module, device) -> None:
    """`module.to_empty(device=device)` keeping every shared parameter shared: a name that aliased another's
    parameter before (`output.weight` of a tied head) is set to that name's new parameter after."""
    owner: dict[int, str] = {}
    aliases = []  # (alias, owner name)
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in owner:
            aliases.append((name, owner[id(p)]))
        else:
            owner[id(p)] = name
    module.to_empty(device=device)
    for alias, first in aliases:
        param = module.get_parameter(first)
        if module.get_parameter(alias) is not param:
            path, _, leaf = alias.rpartition(".")
            setattr(module.get_submodule(path), leaf, param)


@torch.no_grad()
def materialise_each(model: torch.nn.Module, device, seed: int, weights: dict | None = None, after=None) -> None:
    """`materialise`, one module at a time: each module that owns parameters is allocated on `device`, filled (from
    `seed` or `weights`) and handed to `after(module)` before the next is touched. ZeRO-3 partitions it there, which
    frees its full copy, so a rank never holds more than its partitions plus one module in full.

    The parameter objects are kept (their storage is swapped in, not replaced), so an optimizer built on the meta
    skeleton still points at them."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for name, mod, params in model.weight_modules():
            if len(params) != len(
                list(mod.parameters(recurse=False))
            ):  # tied to a weight an earlier module materialised
                raise NotImplementedError(f"{name}: owns parameters another module already materialised")
            mod.to_empty(device=device, recurse=False)
            values = (
                model.initial_values(name, mod, seed)
                if weights is None
                else {k: _checkpoint_value(weights, f"{name}.{k}" if name else k, p) for k, p in params.items()}
            )
            for key, p in params.items():
                p.copy_(values[key].to(p.dtype))
            if after is not None:
                after(mod)
        for mod in model.modules():  # buffers (the RoPE table) of modules without parameters
            if any(b.device.type == "meta" for b in mod.buffers(recurse=False)):
                mod.to_empty(device=device, recurse=False)
        model.init_buffers()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def on_meta(module: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


def optimizer_groups_by_name(optimizer: torch.optim.Optimizer) -> dict:
    """Each parameter group's hyper-parameters (lr as the scheduler last set it, betas, weight decay, ...) by name."""
    return {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict, gather: bool = False) -> dict:
    """The optimizer's state keyed by parameter name instead of position, so any layout can load it.

    names: {parameter tensor: its name in the plain model}. Groups are identified by their "name" field. With
    `gather`, every DTensor is all-gathered to a full CPU tensor (a collective under FSDP)."""
    sd = optimizer.state_dict()
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = {names[ordered[i]]: s for i, s in sd["state"].items()}
    if gather:
        state = {
            name: {k: full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            for name, entry in state.items()
        }
    return {"state": state, "groups": optimizer_groups_by_name(optimizer)}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict, names: dict) -> None:
    """Load a by-name state into `optimizer`, taking the entries of the parameters it holds; each full tensor is
    re-laid out like its parameter (sharded under FSDP)."""
    sd = optimizer.state_dict()
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(ordered):
        entry = saved["state"].get(names[p])
        if entry is not None:
            state[i] = {k: shard_like(v, p) for k, v in entry.items()}
    groups = [{**saved["groups"].get(g["name"], {}), "params": g["params"]} for g in sd["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _adamw_state_like(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter an (empty) AdamW state so a DCP load has tensors of the right layout to fill in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def live_state(modules, optimizer: torch.optim.Optimizer, names: dict) -> dict:
    """The live tensors a DCP save reads and a DCP load fills in place: {"model": {name: tensor}, "optim": {name:
    {state key: tensor}}}. Names are the plain model's, whatever the layout; DTensors stay DTensors (sharded)."""
    model = {}
    for m in modules:
        for name, t in m.state_dict(keep_vars=True).items():
            model[name] = t.detach() if isinstance(t, torch.nn.Parameter) else t
    _adamw_state_like(optimizer)
    optim = {names[p]: dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]}
    return {"model": model, "optim": optim}
