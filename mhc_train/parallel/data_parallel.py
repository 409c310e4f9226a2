"""Data parallelism applied to a built model: torch DDP or DeepSpeed ZeRO (stages 1-3), behind one small engine API
(FSDP2 lives in fsdp.py, the pipeline in pipeline.py).

The trainer talks to an engine only: `forward`, `backward(loss)`, `clip() -> pre-clip norm`, `step()`, `skip()`,
and checkpoint hooks. Launch with `torchrun --nproc_per_node=N -m mhc_train.train ...` (or the `deepspeed`
launcher); `parallel.engine=none` is one process.

Notes:
1. `train.batch_size` is the global batch per micro-step; each rank takes its slice (see data/loader.py), so a run on
   W ranks computes the same mean loss and gradient as one process (to float summation order).
2. DeepSpeed reduces gradients inside `engine.backward()` and steps the LR scheduler inside `engine.step()`. It is
   given a torch AdamW (its "Adam" type would JIT-compile an extension) and our schedule as a torch scheduler.
3. DeepSpeed checkpoints are written by every rank into `checkpoints/deepspeed/<tag>`; the trainer's own
   `step_XXXXXXXX.pt` (model, config, RNG, data position) is written after all ranks finished, atomically, so it
   only ever points at a complete DeepSpeed checkpoint.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun / the deepspeed launcher describe in the environment (no-op alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def mean_across_ranks(value: float, info: DistInfo, device) -> float:
    if info.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world).item()


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


class TorchEngine:
    """One process, or torch DDP across ranks (gradients averaged during backward)."""

    name = "torch"

    def __init__(self, model, optimizer, scheduler, grad_clip: float, info: DistInfo, ddp: bool):
        self.model, self.optimizer, self.scheduler, self.grad_clip = model, optimizer, scheduler, grad_clip
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [info.local_rank] if next(model.parameters()).is_cuda else None
            # broadcast_buffers=False: the only buffer (RoPE's table) is constant, and a per-forward broadcast would
            # make rank 0's evaluation wait on the other ranks
            self.forward = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        else:
            self.forward = model

    def backward(self, loss: torch.Tensor, micro: int, n_micro: int) -> None:
        (loss / n_micro).backward()

    def clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit).item()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _names(self) -> dict:
        return {p: n for n, p in self.model.named_parameters()}

    def state_dict(self) -> dict:
        """Optimizer state keyed by parameter name: loads into any layout (one process, DDP, a pipeline)."""
        from mhc_train.train.checkpoint import optimizer_state_by_name

        return {
            "optimizer": optimizer_state_by_name(self.optimizer, self._names()),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Optimizer state by name (each full tensor re-sharded like its parameter under FSDP) and the scheduler."""
        from mhc_train.parallel.fsdp import load_full_optimizer_state

        load_full_optimizer_state(self.optimizer, state["optimizer"], self._names())
        self.scheduler.load_state_dict(state["scheduler"])

    def dcp_state(self) -> dict:
        """Live model and optimizer tensors by parameter name, for a DCP save or an in-place DCP load."""
        from mhc_train.train.checkpoint import dcp_state

        return dcp_state([self.model], self.optimizer, self._names())

    def save_sharded(self, ckpt_dir, tag: str) -> None:
        pass

    def load_sharded(self, ckpt_dir, tag: str) -> None:
        pass


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO data parallelism: deepspeed.initialize with our optimizer and schedule."""

    name = "deepspeed"

    def __init__(
        self,
        model,
        build_optimizer,
        build_scheduler,
        grad_clip: float,
        info: DistInfo,
        zero_stage: int,
        micro_batch: int,
        grad_accum: int,
        bf16: bool,
        config_file: str = "",
    ):
        import json

        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": zero_stage},
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if config_file:
            with open(config_file) as f:
                config.update(json.load(f))
        self.model, self.grad_clip, self.info = model, grad_clip, info
        # ZeRO-3 partitions the module's parameters in place: it trains a copy, and `self.model` stays whole for rank
        # 0's evaluation, diagnostics and checkpoint file (`sync_full_model` gathers into it).
        self.zero3 = int(config["zero_optimization"].get("stage", zero_stage)) == 3
        self.train_model = copy.deepcopy(model) if self.zero3 else model
        self.optimizer = build_optimizer(self.train_model)
        self.scheduler = build_scheduler(self.optimizer)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.train_model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=config
        )
        if self.zero3:
            from mhc_train.parallel.fsdp import release_eval_copy

            release_eval_copy(model, info)
        self.forward = self.engine

    def backward(self, loss, micro, n_micro) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        if micro < n_micro - 1:
            self.engine.step()  # a no-op off the accumulation boundary, but DeepSpeed counts micro-steps here

    def clip(self) -> float:
        return float("nan")  # known only after engine.step() (DeepSpeed clips inside it)

    def step(self) -> None:
        self.engine.step()

    def sync_full_model(self) -> None:
        """ZeRO-3: gather the partitioned parameters (a collective) and copy them into rank 0's plain model. ZeRO-1/2
        train the model's own parameters, which are always current: nothing to do."""
        import deepspeed

        if not self.zero3:
            return
        params = list(self.train_model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if self.info.is_main:
                self.model.load_state_dict(self.train_model.state_dict())

    def gather_grads(self) -> dict:
        """Every parameter's full, reduced gradient by name (ZeRO-2/3 partition them; DeepSpeed assembles each, a
        collective under ZeRO-3). Call between backward and step, on every rank."""
        from deepspeed.utils import safe_get_full_grad

        grads = {}
        for name, p in self.train_model.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                grads[name] = g.detach().float().cpu().clone()
        return grads

    def pre_clip_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        raise RuntimeError("train.skip_nonfinite is not supported with parallel.engine=deepspeed")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict:
        return {}

    dcp_state = None  # DeepSpeed writes its own shards

    def load_state_dict(self, state: dict) -> None:
        pass

    def save_sharded(self, ckpt_dir, tag: str) -> None:
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag)  # every rank writes its shards

    def load_sharded(self, ckpt_dir, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
        if path is None:
            from mhc_train.train.checkpoint import CheckpointError

            raise CheckpointError(f"DeepSpeed checkpoint {ckpt_dir}/{tag} is missing or incomplete")
