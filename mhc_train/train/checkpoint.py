"""Atomic checkpoints, retention, and the resume compatibility check.

A checkpoint is one file `checkpoints/step_XXXXXXXX.pt`, written as a hidden temporary file, fsynced and renamed:
a kill at any moment leaves either the previous set of complete checkpoints or that set plus the new one, never a
half-written file under a checkpoint name. Leftover temporaries are removed on the next save.

It holds: step, RNG states (torch, CUDA, numpy, python), the data position (seed and next step: batches are a
function of them), the resolved config, the tokenizer reference, the scheduler, and the weights and optimizer state
in one of three forms (`checkpoint.format`):
- `file`: in the file itself, full tensors keyed by parameter name (rank 0 gathers them);
- `dcp`: a torch.distributed.checkpoint directory `checkpoints/dcp/step_XXXXXXXX/` that every rank writes its own
  shards into (DTensor shards stay sharded), keyed by parameter name, so it loads into any layout (one process, DDP,
  FSDP at another size, any pipeline schedule), re-sharding on the fly;
- DeepSpeed's own shards in `checkpoints/deepspeed/step_XXXXXXXX/` under `parallel.engine=deepspeed`.
The sharded directories are complete before the file that points at them is renamed into place.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch

from mhc_train.config import CheckpointConfig

NAME = re.compile(r"^step_(\d{8})\.pt$")
# Keys whose change makes a checkpoint unusable: they change parameter shapes or the meaning of the weights.
FATAL_PREFIXES = ("model.", "connection.")
SAFE_EXCEPTIONS = ("connection.backend",)  # same math, another implementation


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, missing or does not match the run; the message names the file and the fix."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (temporaries are never listed)."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def save(self, step: int, state: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".step_*.tmp*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        final = self.path_for(step)
        tmp = self.dir / f".{final.name}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get("MHC_TRAIN_TEST_SAVE_PAUSE", "0"))  # test seam: widen the mid-write window
        if pause:
            time.sleep(pause)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self.prune()
        return final

    def prune(self) -> None:
        done = self.complete()
        keep = {s for s, _ in done[-self.cfg.keep_last :]} | set(self.cfg.milestones)
        for step, path in done:
            if step not in keep:
                path.unlink(missing_ok=True)
                for sharded in ("deepspeed", "dcp"):  # its sharded engine state, if any
                    shutil.rmtree(self.dir / sharded / path.stem, ignore_errors=True)

    @staticmethod
    def load(path: str | Path) -> dict:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} does not exist; set checkpoint.resume=auto or to an existing file"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); delete it to resume from "
                "the previous one, or set checkpoint.resume to another file"
            ) from e
        if state.get("deepspeed_tag"):  # DeepSpeed keeps optimizer and scheduler in its own shards
            required = {"model", "step", "rng", "config"}
        elif state.get("dcp"):  # weights and optimizer state in the DCP directory
            required = {"step", "rng", "config", "scheduler", "optimizer_groups"}
        else:
            required = {"model", "step", "rng", "config", "optimizer", "scheduler"}
        missing = required - set(state)
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}: it was not written by mhc-train")
        return state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare_configs(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(fatal differences, allowed differences) between two resolved config dicts, as 'key: old -> new' lines."""
    a, b = _flatten(saved), _flatten(current)
    fatal, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
            is_fatal = key.startswith(FATAL_PREFIXES) and key not in SAFE_EXCEPTIONS
            (fatal if is_fatal else allowed).append(line)
    return fatal, allowed


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict) -> dict:
    """The optimizer's state keyed by parameter name instead of position, so any layout can load it.

    names: {parameter tensor: its name in the plain model}. Groups are identified by their "name" field.
    """
    sd = optimizer.state_dict()
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    idx_to_name = {i: names[p] for i, p in enumerate(ordered)}
    return {"state": {idx_to_name[i]: s for i, s in sd["state"].items()}, "groups": optimizer_groups_by_name(optimizer)}


def optimizer_groups_by_name(optimizer: torch.optim.Optimizer) -> dict:
    """Each parameter group's hyper-parameters (lr as the scheduler last set it, betas, weight decay, ...) by name."""
    return {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict, names: dict, convert=None) -> None:
    """Load a by-name state into `optimizer`, taking the entries of the parameters it holds. `convert(value, param)`
    may re-lay each value out like its parameter (FSDP shards a full tensor this way)."""
    sd = optimizer.state_dict()
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(ordered):
        entry = saved["state"].get(names[p])
        if entry is not None:
            state[i] = {k: convert(v, p) for k, v in entry.items()} if convert else entry
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


def dcp_state(modules, optimizer: torch.optim.Optimizer, names: dict) -> dict:
    """The live tensors a DCP save reads and a DCP load fills in place: {"model": {name: tensor}, "optim": {name:
    {state key: tensor}}}. Names are the plain model's, whatever the layout; DTensors stay DTensors (sharded)."""
    model = {}
    for m in modules:
        for name, t in m.state_dict(keep_vars=True).items():
            model[name] = t.detach() if isinstance(t, torch.nn.Parameter) else t
    _adamw_state_like(optimizer)
    optim = {names[p]: dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]}
    return {"model": model, "optim": optim}


def save_dcp(state: dict, directory: Path) -> None:
    """Every rank calls this: writes its shards and (the coordinator) the metadata, which comes last."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory))


def load_dcp(state: dict, directory: Path) -> None:
    """Fill `state` (from `dcp_state`) in place from a DCP directory, re-sharding as needed (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    if not (directory / ".metadata").is_file():
        raise CheckpointError(
            f"DCP checkpoint {directory} is missing or incomplete (no .metadata); delete the step file that points "
            "at it to resume from the previous checkpoint"
        )
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:
        raise CheckpointError(
            f"DCP checkpoint {directory} does not fit this model ({type(e).__name__}: {str(e)[:300]}); resume with "
            "the config it was written with, or start a new run (checkpoint.resume=never)"
        ) from e


def read_model_state(path: str | Path) -> dict:
    """The model weights of a checkpoint file, whatever its format ({name: full tensor}); needs no process group.
    For a DCP checkpoint the shards are read back into full tensors."""
    import tempfile

    path = Path(path)
    state = CheckpointManager.load(path)
    if not state.get("dcp"):
        return state["model"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path.parent / "dcp" / state["dcp"]), str(out))
        return torch.load(out, map_location="cpu", weights_only=False)["model"]
