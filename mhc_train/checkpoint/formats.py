"""The three forms a checkpoint's weights and optimizer state take (`checkpoint.format`), one class each.

- `file`: in the step file itself, full tensors keyed by parameter name (rank 0 gathers them);
- `dcp`: a torch.distributed.checkpoint directory `checkpoints/dcp/step_XXXXXXXX/` that every rank writes its own
  shards into (DTensor shards stay sharded), keyed by parameter name, so it loads into any layout (one process, DDP,
  FSDP at another size, any pipeline schedule), re-sharding on the fly;
- `deepspeed`: DeepSpeed's own shards in `checkpoints/deepspeed/step_XXXXXXXX/` under `parallel.engine=deepspeed`,
  one partition per data-parallel rank; resuming at another world size converts them once to DeepSpeed's
  universal checkpoint (universal.py) and loads that.

Each class has `save` (every rank: the engine's state out, returning what the step file records and the sharded
directory, if any), `load` (every rank: the engine's state back in), `verify` (the step file's digest and every shard
it lists), `weights` (full weights without a process group, for inference), `writer_of` (which rank wrote a file of
its sharded directory: that rank digests it at save time, so no rank reads another's shards) and the keys its step
file must hold. The manager picks the class once (`format_of`, `FORMATS`) and never branches on the format itself.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import torch

from mhc_train.checkpoint import integrity
from mhc_train.checkpoint.errors import CheckpointError
from mhc_train.io.rundir import RunDir
from mhc_train.parallel import Engine
from mhc_train.parallel.state import optimizer_groups_by_name

COMMON = frozenset({"step", "rng", "config"})


def groups(engine: Engine) -> dict:
    """The optimizer's hyper-parameters by param-group name."""
    return optimizer_groups_by_name(engine.optimizer)


class Format:
    name = ""
    required: frozenset = COMMON

    def save(self, engine: Engine, run: RunDir, tag: str) -> tuple[dict, Path | None]:
        raise NotImplementedError

    def load(self, engine: Engine, state: dict, path: Path) -> list[str]:
        raise NotImplementedError

    def verify(self, path: Path, state: dict) -> int:
        """The step file's digest and every shard it lists; returns the bytes checked."""
        total = integrity.verify_file(path)
        shards = state.get("shards")
        if shards:
            total += integrity.verify_shards(path.parent / shards["dir"], shards["files"])
        return total

    def writer_of(self, rel: str) -> int:
        """The rank that wrote the file `rel` of this format's sharded directory (0 where the name does not say)."""
        return 0

    def start_weights(self, state: dict) -> dict | None:
        """The full weights the plain model starts from before the engine is built (None: `load` fills them)."""
        return state["model"]

    def weights(self, state: dict, path: Path) -> dict:
        """The full weights ({name: tensor}), needing no process group."""
        return state["model"]


class FileFormat(Format):
    name = "file"
    required = COMMON | {"model", "optimizer", "scheduler"}

    def save(self, engine: Engine, run: RunDir, tag: str) -> tuple[dict, Path | None]:
        body = {"dcp": None, "deepspeed_tag": None}
        body.update(optimizer=engine.optimizer_state(), scheduler=engine.scheduler.state_dict())
        body["model"] = engine.full_model().state_dict()  # a collective where weights are sharded or cut
        return body, None

    def load(self, engine: Engine, state: dict, path: Path) -> list[str]:
        notes = []
        if not engine.load_optimizer_state(state["optimizer"]):
            notes.append(f"{path} is a file checkpoint: {engine.name} takes its weights only (fresh optimizer)")
        engine.scheduler.load_state_dict(state["scheduler"])
        return notes


class DcpFormat(Format):
    name = "dcp"
    required = COMMON | {"scheduler", "optimizer_groups"}

    def save(self, engine: Engine, run: RunDir, tag: str) -> tuple[dict, Path | None]:
        sharded = run.dcp_dir(tag)
        save_dcp(engine.live_state(), sharded)
        return self.body(engine, tag), sharded

    def body(self, engine: Engine, tag: str) -> dict:
        """What the step file records beside the shards (an asynchronous save takes it when it stages)."""
        return {"dcp": tag, "deepspeed_tag": None, "scheduler": engine.scheduler.state_dict(),
                "optimizer_groups": groups(engine)}  # fmt: skip

    def writer_of(self, rel: str) -> int:
        """torch's FileSystemWriter names rank r's files `__r_<n>.distcp`; the coordinator writes `.metadata`."""
        m = re.match(r"__(\d+)_", Path(rel).name)
        return int(m.group(1)) if m else 0

    def load(self, engine: Engine, state: dict, path: Path) -> list[str]:
        if "dcp" not in engine.checkpoint_formats:
            raise CheckpointError(
                f"{path} is a DCP checkpoint; parallel.engine={engine.name} cannot load it (use none, ddp, fsdp "
                "or a pipeline)"
            )
        load_dcp(engine.live_state(), RunDir.of_step_file(path).dcp_dir(state["dcp"]))
        engine.weights_loaded()  # rank 0's plain model gets the loaded weights at the next full_model()
        engine.scheduler.load_state_dict(state["scheduler"])
        return []

    def start_weights(self, state: dict) -> dict | None:
        return None  # loaded into the engine's own tensors by `load`

    def weights(self, state: dict, path: Path) -> dict:
        """The DCP shards read back into full tensors."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "full.pt"
            dcp_to_torch_save(str(RunDir.of_step_file(path).dcp_dir(state["dcp"])), str(out))
            return torch.load(out, map_location="cpu", weights_only=False)["model"]


class DeepSpeedFormat(Format):
    """DeepSpeed's shards hold everything: weights, optimizer, scheduler. The step file holds no weights of its own
    (older ones did: `model`, still read): a second full copy cost rank 0 a gather and a write at every save, and
    every rank a full read at resume. Export reads them back from DeepSpeed's shards (`weights`)."""

    name = "deepspeed"
    required = COMMON  # DeepSpeed keeps weights, optimizer and scheduler in its own shards

    def save(self, engine: Engine, run: RunDir, tag: str) -> tuple[dict, Path | None]:
        engine.save_native(run.deepspeed_root, tag)  # every rank writes its shards
        return {"dcp": None, "deepspeed_tag": tag}, run.deepspeed_root / tag

    def start_weights(self, state: dict) -> dict | None:
        return state.get("model")  # None: `load` puts DeepSpeed's own shards into the engine

    def weights(self, state: dict, path: Path) -> dict:
        """The full fp32 weights, assembled from DeepSpeed's partitions by its own `zero_to_fp32` (step files written
        before this change hold them: `model`). Needs deepspeed installed, no process group."""
        if "model" in state:
            return state["model"]
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root = RunDir.of_step_file(path).deepspeed_root
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress; export's stdout is the product
            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=state["deepspeed_tag"])

    def writer_of(self, rel: str) -> int:
        """DeepSpeed names data-parallel rank r's partitions `*zero_pp_rank_r_*` (the data-parallel rank is the rank:
        this engine has no model parallelism); rank 0 writes `mp_rank_00_model_states.pt`."""
        m = re.search(r"zero_pp_rank_(\d+)_", Path(rel).name)
        return int(m.group(1)) if m else 0

    def load(self, engine: Engine, state: dict, path: Path) -> list[str]:
        root, tag = RunDir.of_step_file(path).deepspeed_root, state["deepspeed_tag"]
        if self.name not in getattr(engine, "checkpoint_formats", (self.name,)):  # DeepSpeed's shards: its engine
            raise CheckpointError(
                f"cannot resume from {path}: it was written by DeepSpeed (parallel.engine=deepspeed) and this run's "
                f"engine is {engine.name}, which cannot read DeepSpeed's shards; resume with the preset that wrote it "
                "(e.g. torchrun --nproc_per_node=N -m mhc_train.train parallel=zero2 ..., any N), or start a new run "
                "in another run_dir"
            )
        saved = state.get("world_size")
        if saved and saved != engine.dist.world:  # DeepSpeed's partitions are per data-parallel rank
            return self.load_resharded(engine, root, tag, saved, path)
        try:
            engine.load_native(root, tag)
        except (FileNotFoundError, NotImplementedError) as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from e
        return []

    def load_resharded(self, engine: Engine, root: Path, tag: str, saved: int, path: Path) -> list[str]:
        """Another world size: through DeepSpeed's universal checkpoint (converted once, by rank 0, `universal.py`)."""
        from mhc_train.checkpoint.universal import ensure_universal

        converted = ensure_universal(root / tag, engine.dist)
        try:
            engine.load_universal(converted.parent, converted.name)
        except (FileNotFoundError, NotImplementedError) as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from e
        return [f"resumed DeepSpeed's {saved}-rank checkpoint at {engine.dist.world} ranks through its universal "
                f"form ({converted})"]  # fmt: skip


FORMATS: dict[str, Format] = {f.name: f for f in (FileFormat(), DcpFormat(), DeepSpeedFormat())}


def format_of(state: dict) -> Format:
    """The format a step file's state was written in."""
    if state.get("deepspeed_tag"):
        return FORMATS["deepspeed"]
    return FORMATS["dcp"] if state.get("dcp") else FORMATS["file"]


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
