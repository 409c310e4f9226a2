"""DeepSpeed ZeRO (stages 1-3) data parallelism, applied to a built model (torch DDP and one process are
`engine.LocalEngine`, FSDP2 is fsdp.py, the pipeline pipeline.py).

Launch with `torchrun --nproc_per_node=N -m mhc_train.train ...` (or the `deepspeed` launcher).

Notes:
1. `train.batch_size` is the global batch per micro-step; each rank takes its slice (see data/loader.py), so a run on
   W ranks computes the same mean loss and gradient as one process (to float summation order).
2. DeepSpeed reduces gradients inside `engine.backward()`, clips and steps the LR scheduler inside `engine.step()`.
   It is given a torch AdamW (its "Adam" type would JIT-compile an extension) and our schedule as a torch scheduler.
3. DeepSpeed checkpoints are written by every rank into its own directory (`save_native`); the trainer's step file
   (model, config, RNG, data position) is written after all ranks finished, atomically, so it only ever points at a
   complete DeepSpeed checkpoint. At another world size the checkpoint is read through DeepSpeed's universal form
   (`load_universal`; converted by checkpoint/universal.py).
4. The DeepSpeed config is built in one function, `deepspeed_config` (no process group: testable alone), from the run's
   shape and `parallel.zero` (overlap, contiguous gradients, bucket and ZeRO-3 prefetch sizes: DeepSpeed's defaults
   unless set; `overlap_comm=auto` turns overlap on under CUDA, where a second stream exists to overlap on).
"""

from __future__ import annotations

import copy
import json

import torch

from mhc_train.parallel.compile import apply_compile as compile_blocks
from mhc_train.parallel.engine import LocalEngine, materialise_on_host, release_eval_copy
from mhc_train.parallel.state import materialise, materialise_each, on_meta

ZERO_12_KEYS = ("contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size")
ZERO_3_KEYS = (
    "contiguous_gradients",
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


def zero_optimization(zero_stage: int, zero=None, device_type: str = "cpu") -> dict:
    """DeepSpeed's `zero_optimization` section: the stage and `parallel.zero`'s throughput settings (a ZeroConfig or
    a dict of its keys; None: the stage alone, DeepSpeed's defaults). Stage 3 gets its prefetch / persistence knobs,
    stages 1-2 the all-gather bucket."""
    section: dict = {"stage": zero_stage}
    if zero is None:
        return section
    get = zero.get if isinstance(zero, dict) else lambda k, d=None: getattr(zero, k, d)
    for key in ZERO_3_KEYS if zero_stage == 3 else ZERO_12_KEYS:
        if get(key) is not None:
            section[key] = get(key)
    overlap = str(get("overlap_comm", "auto")).lower()
    if overlap in ("on", "true") or (overlap == "auto" and device_type == "cuda"):
        section["overlap_comm"] = True
    elif overlap in ("off", "false"):
        section["overlap_comm"] = False
    return section  # auto off CUDA: DeepSpeed's own default (on for ZeRO-3, off for 1-2)


def deepspeed_config(micro_batch: int, grad_accum: int, zero_stage: int, grad_clip: float, zero=None,
                     device_type: str = "cpu", config_file: str = "") -> dict:  # fmt: skip
    """The DeepSpeed config of a run; the keys of `config_file` (parallel.deepspeed_config, a JSON) win."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero_optimization(zero_stage, zero, device_type),
        "gradient_clipping": grad_clip,
        # Not DeepSpeed's bf16 mode: it casts the whole module to bf16 (phi and the gates with it, and the RoPE
        # table). Our precision policy instead: fp32 parameters (DeepSpeed's fp32 path), bf16 compute under
        # autocast (Engine.loss), the connection's coefficient path fp32 inside it.
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if config_file:
        with open(config_file) as f:
            config.update(json.load(f))
    return config


class DeepSpeedEngine(LocalEngine):
    """DeepSpeed ZeRO data parallelism: deepspeed.initialize with our optimizer and schedule."""

    name = "deepspeed"
    checkpoint_formats = ("deepspeed",)

    def __init__(self, model, build_optimizer, build_scheduler, dist, device, grad_clip, autocast_dtype,
                 grad_accum: int, zero_stage: int, micro_batch: int, config_file: str = "",
                 compile: bool = False, seed: int = 0, weights: dict | None = None, zero=None):  # fmt: skip
        import deepspeed

        device_type = torch.device(device).type
        config = deepspeed_config(micro_batch, grad_accum, zero_stage, grad_clip, zero, device_type, config_file)
        # Built from the meta device. ZeRO-1/2 keep whole parameters on every rank: the model is allocated once, on
        # the device, and trained itself. ZeRO-3 partitions parameters in place: the training copy is allocated,
        # filled (seed or checkpoint weights) and partitioned one module at a time (`state.materialise_each`), so
        # no rank ever holds more than its partitions plus one module in full, on the host or the device. The
        # optimizer is built first, on the skeleton: its groups read each parameter's shape, which partitioning
        # hides, and the parameter objects survive materialisation. Rank 0's plain view stays on `meta` until a file
        # checkpoint needs it (then in host memory, `_sync_full_model`); diagnostics run through the engine.
        self.zero3 = int(config["zero_optimization"].get("stage", zero_stage)) == 3
        self.train_model = copy.deepcopy(model) if self.zero3 else model  # a copy of a meta skeleton is free
        if compile:  # per block, in place, before DeepSpeed wraps it (parallel/compile.py)
            compile_blocks(self.train_model)
        built_on_meta = on_meta(self.train_model)
        if built_on_meta and not self.zero3:
            materialise(self.train_model, device, seed, weights)
        elif not built_on_meta and self.zero3:
            release_eval_copy(model, dist)
        optimizer = build_optimizer(self.train_model)
        scheduler = build_scheduler(optimizer)
        if built_on_meta and self.zero3:

            def partition(module):
                deepspeed.zero.Init(module=module, config_dict_or_path=config, dtype=torch.float32)

            materialise_each(self.train_model, "cpu", seed, weights, after=partition)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.train_model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        super().__init__(model, optimizer, scheduler, dist, device, grad_clip, autocast_dtype, grad_accum)
        self.forward = self.ds

    def eval_forward(self):
        return self.ds  # under ZeRO-3 its hooks gather each layer's partitions

    def diag_modules(self):
        """ZeRO-3: every rank runs the diagnostics through the engine (its hooks gather each module's partitions, and
        ours run after them); ZeRO-1/2 hold whole parameters: rank 0 diagnoses the plain model."""
        return (self.train_model, self.ds) if self.zero3 else None

    def train_parameters(self):
        return self.train_model.parameters()

    def param_names(self) -> dict:
        return {p: n for n, p in self.train_model.named_parameters()}

    def backward(self, loss, micro) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself
        if micro < self.grad_accum - 1:
            self.ds.step()  # a no-op off the accumulation boundary, but DeepSpeed counts micro-steps here

    def step(self) -> torch.Tensor:
        """DeepSpeed clips inside its step; the pre-clip norm is known after it (DeepSpeed itself may read it)."""
        self.ds.step()
        self._version += 1
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float64)

    def skip(self) -> None:
        raise RuntimeError("train.skip_nonfinite is not supported with parallel.engine=deepspeed")

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def local_named_grads(self):
        return None  # ZeRO-2/3 partition the gradients

    def _sync_full_model(self) -> None:
        """ZeRO-3: gather the partitioned parameters (a collective) and copy them into rank 0's plain model. ZeRO-1/2
        train the model's own parameters, which are always current: nothing to do."""
        import deepspeed

        if not self.zero3:
            return
        state = {}
        for name, p in self.train_model.named_parameters():  # one parameter gathered at a time
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.dist.is_main:
                    state[name] = p.detach().cpu().clone()
        if self.dist.is_main:
            materialise_on_host(self.model, state)

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

    def optimizer_state(self) -> dict:
        raise NotImplementedError("DeepSpeed keeps its optimizer state in its own checkpoints (save_native)")

    def load_optimizer_state(self, saved: dict) -> bool:
        return False  # a file checkpoint gives DeepSpeed its weights only (loaded before deepspeed.initialize)

    def save_native(self, directory, tag: str) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag)  # every rank writes its shards

    def load_native(self, directory, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint {directory}/{tag} is missing or incomplete")
        self.weights_loaded()

    def load_universal(self, directory, tag: str) -> None:
        """Load DeepSpeed's universal form of a checkpoint (any world size; `checkpoint/universal.py` converts it):
        weights, optimizer moments and step per parameter, scheduler and DeepSpeed's counters. DeepSpeed reads its
        `checkpoint.load_universal` setting at load time only, so it is switched on for this one call."""
        config = self.ds._config
        config.load_universal_checkpoint = True
        try:
            path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_module_strict=True)
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed universal checkpoint {directory}/{tag} is missing or incomplete")
        self.weights_loaded()
