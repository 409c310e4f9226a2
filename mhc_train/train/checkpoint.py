"""Atomic checkpoints, retention, and the resume compatibility check.

All checkpoint state lives here, whatever the engine: the engine gives primitives (`mhc_train.parallel.Engine`:
`checkpoint_formats`, by-name optimizer state, live DCP tensors, a native format), the run directory gives the paths
(`mhc_train.rundir.RunDir`), and this module decides what is written where and how it is read back.

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
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mhc_train.config import CheckpointConfig
from mhc_train.parallel import DistInfo, Engine, barrier
from mhc_train.parallel.state import optimizer_groups_by_name
from mhc_train.rundir import RunDir

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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """The checkpoints of one run directory: listing, atomic writes, retention, and engine state in and out."""

    def __init__(self, run_dir: str | Path | RunDir, cfg: CheckpointConfig, dist: DistInfo | None = None):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.dir = self.run.checkpoints
        self.cfg = cfg
        self.dist = dist or DistInfo()

    def path_for(self, step: int) -> Path:
        return self.run.step_file(step)

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (temporaries are never listed)."""
        return self.run.step_files()

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    # ---- writing -----------------------------------------------------------------------------------------------
    def format_for(self, engine: Engine) -> str:
        """file | dcp | the engine's native format: checkpoint.format where the engine supports it, else (and for
        auto) the engine's first format."""
        fmt = self.cfg.format
        return fmt if fmt in engine.checkpoint_formats else engine.checkpoint_formats[0]

    def save(self, engine: Engine, step: int, meta: dict) -> Path:
        """Every rank calls this. Sharded engine state first (all ranks), then rank 0's atomic step file holding
        `meta` (counters, RNG, config, ...) and what points at the shards."""
        fmt, tag = self.format_for(engine), self.run.tag(step)
        body: dict = {"dcp": None, "deepspeed_tag": None}
        if fmt == "dcp":
            save_dcp(engine.live_state(), self.run.dcp_dir(tag))
            body.update(dcp=tag, scheduler=engine.scheduler.state_dict(), optimizer_groups=groups(engine))
        elif fmt == "file":
            body.update(optimizer=engine.optimizer_state(), scheduler=engine.scheduler.state_dict())
        else:
            engine.save_native(self.run.deepspeed_root, tag)  # every rank writes its shards
            body.update(deepspeed_tag=tag)
        if fmt != "dcp":
            body["model"] = engine.full_model().state_dict()  # a collective where weights are sharded or cut
        barrier(self.dist)  # every shard is complete before the file that points at them exists
        path = self.path_for(step)
        if self.dist.is_main:
            self.write(step, {**body, **meta, "world_size": self.dist.world, "step": step, "rng": rng_state()})
        barrier(self.dist)
        return path

    def write(self, step: int, state: dict) -> Path:
        """Rank 0: the step file, written as a hidden temporary, fsynced and renamed; then retention."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run.temp_files():  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        final = self.path_for(step)
        tmp = self.run.temp_file(step, os.getpid())
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
                for sharded in self.run.sharded_dirs(path.stem):  # its sharded engine state, if any
                    shutil.rmtree(sharded, ignore_errors=True)

    # ---- reading -----------------------------------------------------------------------------------------------
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

    def read(self, path: Path, config: dict, tokenizer: dict) -> tuple[dict, list[str]]:
        """(state, allowed config changes) of the checkpoint at `path`, checked against this run's resolved config and
        tokenizer reference; raises CheckpointError naming the problem and the fix."""
        state = self.load(path)
        fatal, allowed = compare_configs(state["config"], config)
        if fatal:
            raise CheckpointError(
                f"cannot resume from {path}: the config changes the model. Differing keys:\n  "
                + "\n  ".join(fatal)
                + "\nRestore these values, or start a new run (another run_dir, or checkpoint.resume=never)."
            )
        tok = state.get("tokenizer", {})
        if tok.get("sha256") and tok["sha256"] != tokenizer["sha256"]:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with tokenizer {tok['path']} (sha256 {tok['sha256'][:12]}) "
                f"but the data now uses {tokenizer['path']} (sha256 {tokenizer['sha256'][:12]}); "
                "point data.out_dir / data.tokenizer_model back at the original tokenizer"
            )
        return state, allowed

    @staticmethod
    def load_weights(model: torch.nn.Module, state: dict) -> None:
        """Weights of a step file into the plain model, before any engine wraps it (a DCP checkpoint's weights are
        loaded into the engine's own tensors by `restore`)."""
        if not state.get("dcp"):
            model.load_state_dict(state["model"])

    def restore(self, engine: Engine, state: dict, path: Path) -> list[str]:
        """Optimizer, scheduler (and DCP weights) into the built engine, and the RNG states; every rank calls it.
        Returns notes for the log."""
        notes = []
        if state.get("deepspeed_tag"):
            try:
                engine.load_native(self.run.deepspeed_root, state["deepspeed_tag"])
            except (FileNotFoundError, NotImplementedError) as e:
                raise CheckpointError(f"cannot resume from {path}: {e}") from e
        elif state.get("dcp"):
            if "dcp" not in engine.checkpoint_formats:
                raise CheckpointError(
                    f"{path} is a DCP checkpoint; parallel.engine={engine.name} cannot load it (use none, ddp, fsdp "
                    "or a pipeline)"
                )
            load_dcp(engine.live_state(), self.run.dcp_dir(state["dcp"]))
            engine.weights_loaded()  # rank 0's plain model gets the loaded weights at the next full_model()
            for group in engine.optimizer.param_groups:  # the hyper-parameters the scheduler last set (lr)
                group.update(state["optimizer_groups"].get(group["name"], {}))
            engine.scheduler.load_state_dict(state["scheduler"])
        else:
            if not engine.load_optimizer_state(state["optimizer"]):
                notes.append(f"{path} is a file checkpoint: {engine.name} takes its weights only (fresh optimizer)")
            engine.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return notes


def groups(engine: Engine) -> dict:
    return optimizer_groups_by_name(engine.optimizer)


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


def save_dcp(state: dict, directory: Path) -> None:
    """Every rank calls this: writes its shards and (the coordinator) the metadata, which comes last."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(directory))


def load_dcp(state: dict, directory: Path) -> None:
    """Fill `state` (from `Engine.live_state`) in place from a DCP directory, re-sharding as needed (every rank)."""
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
        dcp_to_torch_save(str(RunDir.of_step_file(path).dcp_dir(state["dcp"])), str(out))
        return torch.load(out, map_location="cpu", weights_only=False)["model"]
