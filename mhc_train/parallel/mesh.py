"""One device mesh for every parallelism: the launched ranks as named dimensions, built once from the config, and the
only place that knows how a rank's coordinates map to process groups.

Dimensions, outermost first (the order of torch's and torchtitan's meshes, so that the innermost, chattiest
dimensions land on ranks of one node):

    pp            pipeline stages                     parallel.pp
    dp_replicate  data-parallel replicas (HSDP)       parallel.dp_replicate
    dp_shard      data-parallel shards (FSDP2)        world / (pp x dp_replicate x cp x tp)
    cp            context parallel                    parallel.cp  (room only: refused above 1)
    tp            tensor (+ sequence) parallel        parallel.tp  (parallel/tensor_parallel.py)

Expert parallelism (parallel.ep) is carved from the data-parallel ranks (ep divides dp_shard: config validate_ep).
Where ep equals dp_shard the experts are laid out over `dp_mesh()` itself (parallel/expert_parallel.py); where ep is
below it, or with dp_replicate > 1, `expert_meshes()` splits dp_shard into (dp_mod_ep = dp_shard / ep, ep), ep
innermost (an expert group is ep neighbouring ranks), in a second torch mesh over the same ranks
(parallel/expert_layout.py). The data-parallel size is world / (pp x tp x cp).

Notable choices:
- Coordinates are arithmetic on the rank (rank = ((((pp_rank * R + r) * S + s) * CP + c) * TP + t)), so sizes,
  coordinates and `describe` need no process group; the torch `DeviceMesh` is built on first use of a sub-mesh or a
  group, with the size-1 dimensions left out (a pipeline alone builds no mesh and sends over the default group).
  Under torch's fake process group this builds at any world size.
- `dp_mesh()` is what FSDP2 shards over: 1-D ("dp_shard",) or, with dp_replicate > 1, 2-D ("dp_replicate",
  "dp_shard"), which `fully_shard` runs as HSDP (shard within a node, replicate across nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mhc_train.config import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelMesh:
    """Sizes and this rank's coordinates on the named dimensions, and the sub-meshes / groups built from them."""

    sizes: dict[str, int]  # every name of DIMS -> its size (1 where unused)
    rank: int = 0
    device_type: str = "cpu"
    ep: int = 1  # expert-parallel size, carved from dp_shard (`expert_meshes` where it is below dp_shard)
    _mesh: object = field(default=None, repr=False)  # the torch DeviceMesh, built on first use
    _expert_mesh: object = field(default=None, repr=False)  # the experts' torch DeviceMesh (`expert_meshes`)

    def __post_init__(self):
        self.coords = {}
        rest = self.rank
        for name in reversed(DIMS):  # innermost varies fastest
            self.coords[name] = rest % self.sizes[name]
            rest //= self.sizes[name]
        self.coords = {name: self.coords[name] for name in DIMS}

    # ---- sizes and coordinates ----------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return _prod(self.sizes.values())

    @property
    def pp(self) -> int:
        return self.sizes["pp"]

    @property
    def tp(self) -> int:
        return self.sizes["tp"]

    @property
    def cp(self) -> int:
        return self.sizes["cp"]

    @property
    def dp_replicate(self) -> int:
        return self.sizes["dp_replicate"]

    @property
    def dp_shard(self) -> int:
        return self.sizes["dp_shard"]

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the model (the global batch splits over them): dp_replicate x dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def dp_rank(self) -> int:
        """This rank's slice of the global batch, of `dp`."""
        return self.coords["dp_replicate"] * self.dp_shard + self.coords["dp_shard"]

    def describe(self) -> str:
        used = [f"{name}={size}" for name, size in self.sizes.items() if size > 1]
        return " x ".join(used) if used else "one rank"

    # ---- torch meshes and groups ---------------------------------------------------------------------------------
    @property
    def device_mesh(self):
        """The one torch `DeviceMesh` over the dimensions of size > 1 (dp_shard always kept: FSDP2 shards over it),
        built on first use (a collective the first time: every rank reaches it in the same order)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            names = tuple(n for n in DIMS if self.sizes[n] > 1 or n == "dp_shard")
            shape = tuple(self.sizes[n] for n in names)
            self._mesh = init_device_mesh(self.device_type, shape, mesh_dim_names=names)
        return self._mesh

    def dp_mesh(self):
        """What FSDP2 shards over: ("dp_shard",), or ("dp_replicate", "dp_shard") for HSDP when dp_replicate > 1."""
        mesh = self.device_mesh
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]

    def tp_mesh(self):
        """The 1-D sub-mesh tensor parallelism shards over (`parallel.tp`, innermost: the ranks of one node)."""
        return self.device_mesh["tp"]

    def pp_group(self):
        """The pipeline's process group: None (the default group) when the pipeline spans every rank."""
        if self.pp == self.world:
            return None
        return self.device_mesh["pp"].get_group()

    def expert_meshes(self):
        """(the 1-D ("ep",) sub-mesh the experts are Shard(0) over and their token all-to-all runs on, the mesh FSDP2
        shards them over: ("dp_mod_ep",), or ("dp_replicate", "dp_mod_ep") for HSDP) from a second torch mesh whose
        dp_shard is split into (dp_shard / ep, ep), row-major, so each rank keeps its coordinates. Built on first use
        (a collective: every rank reaches it in the same order)."""
        if self._expert_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            names, shape = [], []
            for n in DIMS:
                if n == "dp_shard":  # ep innermost within dp_shard: an expert group is ep neighbouring ranks
                    names, shape = names + ["dp_mod_ep", "ep"], shape + [self.dp_shard // self.ep, self.ep]
                elif self.sizes[n] > 1:
                    names, shape = names + [n], shape + [self.sizes[n]]
            mesh = init_device_mesh(self.device_type, tuple(shape), mesh_dim_names=tuple(names))
            fsdp = mesh["dp_replicate", "dp_mod_ep"] if self.dp_replicate > 1 else mesh["dp_mod_ep"]
            self._expert_mesh = (mesh["ep"], fsdp)  # sliced once: the dispatch reads it in every MoE forward
        return self._expert_mesh


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def build_mesh(cfg, dist, pp: int | None = None) -> ParallelMesh:
    """The mesh of `cfg.parallel` over `dist`'s world (`pp` overrides parallel.pp: a pipeline's stages on one rank for
    benchmarks). Sizes the config leaves out (tp, cp, ep: later issues) read as 1."""
    p = cfg.parallel
    pp = pp or p.pp
    tp, cp = getattr(p, "tp", 1), getattr(p, "cp", 1)
    replicate = getattr(p, "dp_replicate", 1)
    inner = pp * tp * cp * replicate
    if dist.world % inner:
        raise ConfigError(
            f"{dist.world} ranks do not split into pp={pp} x dp_replicate={replicate} x cp={cp} x tp={tp}: launch a "
            f"multiple of {inner}"
        )
    sizes = {"pp": pp, "dp_replicate": replicate, "dp_shard": dist.world // inner, "cp": cp, "tp": tp}
    device = torch.device(dist.device)
    return ParallelMesh(sizes, dist.rank, device.type, ep=getattr(p, "ep", 1))
