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

import hashlib
import os
import random
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mhc_train.config import CheckpointConfig
from mhc_train.io.files import fsync_dir
from mhc_train.parallel import DistInfo, Engine, barrier
from mhc_train.parallel.state import optimizer_groups_by_name
from mhc_train.rundir import RunDir

# Keys whose change makes a checkpoint unusable: they change parameter shapes or the meaning of the weights.
FATAL_PREFIXES = ("model.", "connection.")
SAFE_EXCEPTIONS = ("connection.backend",)  # same math, another implementation


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, missing or does not match the run; the message names the file and the fix."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's bytes do not match the digests written with it (never loaded; auto-resume moves it aside)."""


class UnverifiableCheckpoint(CheckpointError):
    """A step file without a digest footer (older than digests, or cut at the end): refused, not moved aside."""


# Every step file ends with a footer: MAGIC, the digest of the bytes before the footer, and their length. torch.load
# reads the zip in front of it and ignores the footer; `verify_file` checks it. Sharded state (DCP, DeepSpeed) is
# covered by the step file itself: it lists the digest and size of every file in the directories it points at.
# The digest is a tree: the CRC-32 of each CHUNK-byte piece, hashed together with sha256. Any change to a piece is
# caught with probability 1 - 2^-32, the pieces are checked in parallel threads (zlib and os.pread release the GIL),
# and the whole check runs at several GB/s (scripts/bench_checkpoint.py). It detects corruption (disk, network,
# a partial copy); like any digest stored beside the data without a key, it is no defence against deliberate edits.
MAGIC = b"MHCCRC1\0"
FOOTER = len(MAGIC) + 32 + 8
CHUNK = 16 << 20


def _digest(path: Path, limit: int | None = None) -> str:
    """The tree digest of the first `limit` bytes of `path` (all of it by default)."""
    size = path.stat().st_size if limit is None else limit
    fd = os.open(path, os.O_RDONLY)
    try:

        def piece(offset: int) -> bytes:
            return zlib.crc32(os.pread(fd, min(CHUNK, size - offset), offset)).to_bytes(4, "little")

        offsets = range(0, size, CHUNK)
        if len(offsets) <= 1:
            leaves = [piece(o) for o in offsets]
        else:
            with ThreadPoolExecutor(min(len(offsets), os.cpu_count() or 1, 8)) as pool:
                leaves = list(pool.map(piece, offsets))
    finally:
        os.close(fd)
    return hashlib.sha256(size.to_bytes(8, "little") + b"".join(leaves)).hexdigest()


def _append_footer(path: Path) -> None:
    size = path.stat().st_size
    digest = bytes.fromhex(_digest(path))
    with open(path, "ab") as f:
        f.write(MAGIC + digest + size.to_bytes(8, "little"))
        f.flush()
        os.fsync(f.fileno())


def verify_file(path: Path) -> int:
    """Check a step file's footer digest; returns the bytes verified. Raises CheckpointError naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - FOOTER))
        footer = f.read(FOOTER)
    if size < FOOTER or footer[: len(MAGIC)] != MAGIC:
        raise UnverifiableCheckpoint(
            f"checkpoint {path} has no integrity footer: it was written before checkpoints carried digests, or it is "
            "truncated. It was not loaded or moved; to load it unverified set checkpoint.verify=false"
        )
    digest, length = footer[len(MAGIC) : len(MAGIC) + 32].hex(), int.from_bytes(footer[-8:], "little")
    if length != size - FOOTER:
        raise CheckpointError(f"checkpoint {path} is damaged: its footer records {length} bytes, the file holds {size}")
    if _digest(path, length) != digest:
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the digest written with it")
    return size


def shard_digests(directory: Path) -> dict:
    """{path relative to `directory`: [size, sha256]} of every file under it."""
    return {
        str(f.relative_to(directory)): [f.stat().st_size, _digest(f)]
        for f in sorted(directory.rglob("*"))
        if f.is_file()
    }


def verify_shards(directory: Path, digests: dict) -> int:
    """Check every file a step file lists under `directory`; returns the bytes verified."""
    total = 0
    for rel, (size, digest) in digests.items():
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard {f} is missing")
        if f.stat().st_size != size or _digest(f) != digest:
            raise CheckpointError(f"checkpoint shard {f} is damaged: it does not match the digest its step file lists")
        total += size
    return total


def rng_state() -> dict:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
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
        self._chosen: tuple[Path, dict] | None = None  # the state `choose` verified and loaded (read uses it)

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
        `meta` (counters, RNG, config, ...), what points at the shards and their digests."""
        fmt, tag = self.format_for(engine), self.run.tag(step)
        body: dict = {"dcp": None, "deepspeed_tag": None}
        sharded = None
        if fmt == "dcp":
            sharded = self.run.dcp_dir(tag)
            save_dcp(engine.live_state(), sharded)
            body.update(dcp=tag, scheduler=engine.scheduler.state_dict(), optimizer_groups=groups(engine))
        elif fmt == "file":
            body.update(optimizer=engine.optimizer_state(), scheduler=engine.scheduler.state_dict())
        else:
            engine.save_native(self.run.deepspeed_root, tag)  # every rank writes its shards
            sharded = self.run.deepspeed_root / tag
            body.update(deepspeed_tag=tag)
        if fmt != "dcp":
            body["model"] = engine.full_model().state_dict()  # a collective where weights are sharded or cut
        barrier(self.dist)  # every shard is complete before the file that points at them exists
        path = self.path_for(step)
        if self.dist.is_main:
            if sharded is not None:
                body["shards"] = {"dir": str(sharded.relative_to(self.dir)), "files": shard_digests(sharded)}
            self.write(step, {**body, **meta, "world_size": self.dist.world, "step": step, "rng": rng_state()})
        barrier(self.dist)
        return path

    def write(self, step: int, state: dict) -> Path:
        """Rank 0: the step file, written as a hidden temporary with its digest footer, fsynced and renamed; read
        back and verified; then retention (which therefore never removes the newest verified checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run.temp_files():  # left by a run killed mid-write (the run directory's lock is ours)
            stale.unlink(missing_ok=True)
        final = self.path_for(step)
        tmp = self.run.temp_file(step, os.getpid())
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        _append_footer(tmp)
        pause = float(os.environ.get("MHC_TRAIN_TEST_SAVE_PAUSE", "0"))  # test seam: widen the mid-write window
        if pause:
            time.sleep(pause)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        verify_file(final)  # what landed on disk is what we meant to write, before anything older goes (the shards'
        # digests were computed from the files on disk a moment ago)
        self.prune(keep=step)
        return final

    def prune(self, keep: int | None = None) -> None:
        """Keep the newest `keep_last`, the milestones, and step `keep` (the one just written)."""
        done = self.complete()
        keep = {s for s, _ in done[-self.cfg.keep_last :]} | set(self.cfg.milestones) | {keep}
        for step, path in done:
            if step not in keep:
                path.unlink(missing_ok=True)
                for sharded in self.run.sharded_dirs(path.stem):  # its sharded engine state, if any
                    shutil.rmtree(sharded, ignore_errors=True)

    # ---- reading -----------------------------------------------------------------------------------------------
    def verify(self, path: Path, state: dict) -> int:
        """The step file's digest and every shard it lists; returns the bytes checked (CorruptCheckpoint if not)."""
        total = verify_file(path)
        shards = state.get("shards")
        if shards:
            total += verify_shards(path.parent / shards["dir"], shards["files"])
        return total

    @staticmethod
    def load(path: str | Path, verify: bool = True, timings: dict | None = None, trusted: bool = False) -> dict:
        """A step file's state; with `verify`, its digest is checked in a background thread while torch.load parses
        it, and the state is returned only if the digest matches (CorruptCheckpoint otherwise). Parsing unverified
        bytes is safe: the load is `weights_only` (tensors and plain containers; no code runs from the file).
        `timings` receives the verification's seconds and bytes. `trusted` (checkpoint.verify=false) unpickles in
        full, as files written before digests existed need (their numpy RNG state)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} does not exist; set checkpoint.resume=auto or to an existing file"
            )

        def check() -> tuple[int, float]:
            t0 = time.perf_counter()
            return verify_file(path), time.perf_counter() - t0

        with ThreadPoolExecutor(1) as pool:
            verified = pool.submit(check) if verify else None
            try:
                state, failure = torch.load(path, map_location="cpu", weights_only=not trusted), None
            except Exception as e:
                state, failure = None, e
            if verified is not None:
                try:
                    nbytes, seconds = verified.result()
                except UnverifiableCheckpoint:
                    raise
                except CheckpointError as e:
                    raise CorruptCheckpoint(str(e)) from None
                if timings is not None:
                    timings.update(bytes=nbytes, seconds=seconds)
        if failure is not None:
            raise CorruptCheckpoint(
                f"checkpoint {path} is corrupt or unreadable ({type(failure).__name__}: {str(failure)[:300]}); resume "
                "from the previous one (checkpoint.resume=auto moves a damaged checkpoint aside), or set "
                "checkpoint.resume to another file"
            ) from failure
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

    def _load_verified(self, path: Path) -> tuple[dict, str]:
        """Load the step file with its digest checked alongside, then verify its shards; returns (state, a log line
        with the cost)."""
        t0, timings = time.perf_counter(), {}
        if not self.cfg.verify:
            state = self.load(path, verify=False, trusted=True)
            return state, f"loaded {path.name} unverified (checkpoint.verify=false) in {time.perf_counter() - t0:.3f} s"
        state = self.load(path, timings=timings)
        load_s, nbytes, verify_s = time.perf_counter() - t0, timings["bytes"], timings["seconds"]
        shards = state.get("shards")
        if shards:
            t1 = time.perf_counter()
            try:
                nbytes += verify_shards(path.parent / shards["dir"], shards["files"])
            except CheckpointError as e:
                raise CorruptCheckpoint(str(e)) from None
            verify_s += time.perf_counter() - t1
        mib = nbytes / 2**20
        line = (
            f"verified {path.name}{' and its shards' if shards else ''}: {mib:,.1f} MiB in {verify_s:.3f} s "
            f"({mib / max(verify_s, 1e-9):,.0f} MiB/s; the step file's load, alongside, took {load_s:.3f} s)"
        )
        return state, line

    def move_aside(self, path: Path, why: str = "damaged") -> Path:
        """A checkpoint, with its sharded directories, into checkpoints/<why>/ (kept; a name already taken there gets
        a time suffix, so nothing moved aside earlier is overwritten)."""
        root = self.dir / why
        suffix = "" if not (root / path.name).exists() else time.strftime(".%Y%m%d-%H%M%S") + f".{os.getpid()}"
        dest = root / (path.name + suffix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        for sharded in self.run.sharded_dirs(path.stem):
            if sharded.is_dir():
                target = root / sharded.relative_to(self.dir)
                target = target.with_name(target.name + suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(sharded, target)
        return dest

    def choose(self, mode: str) -> tuple[Path | None, list[str]]:
        """Rank 0: the checkpoint to resume from for `checkpoint.resume` (auto: the newest one that verifies; damaged
        newer ones are moved aside, never deleted), and log lines saying what happened."""
        if mode == "never":
            return None, []
        if mode != "auto":
            path = Path(mode)
            state, line = self._load_verified(path)  # raises on damage: an explicit choice is never replaced
            self._chosen = (path, state)
            notes = [line]
            if path.resolve().parent == self.dir.resolve():  # an older checkpoint of this run: the newer ones belong
                for step, newer in self.complete():  # to a timeline this resume abandons; keep them, out of the way
                    if step > state["step"]:
                        notes.append(f"resuming from step {state['step']}: moved the newer {newer.name} aside to "
                                     f"{self.move_aside(newer, 'superseded')}")  # fmt: skip
            return path, notes
        notes = []
        for _, path in reversed(self.complete()):
            try:
                state, line = self._load_verified(path)
                self._chosen = (path, state)
            except CorruptCheckpoint as e:
                dest = self.move_aside(path)
                notes.append(f"{e}; moved it aside to {dest}")
                continue
            if notes:
                notes.append(f"resuming from {path} instead, the newest checkpoint that verifies")
            return path, [*notes, line]
        if notes:  # there were checkpoints and none verifies: never start over silently
            raise CorruptCheckpoint(
                "\n".join(notes) + f"\nno checkpoint in {self.dir} verifies, so none was loaded: restore one from a "
                "backup (checkpoint.resume=<file>), or start over in another run_dir"
            )
        return None, notes

    def read(self, path: Path, config: dict, tokenizer: dict) -> tuple[dict, list[str]]:
        """(state, allowed config changes) of the checkpoint at `path`, checked against this run's resolved config and
        tokenizer reference; raises CheckpointError naming the problem and the fix. `choose` verified it."""
        chosen, self._chosen = self._chosen, None
        state = (
            chosen[1] if chosen and chosen[0] == path else self.load(path, verify=False, trusted=not self.cfg.verify)
        )
        fatal, allowed = compare_configs(state["config"], config)
        if fatal:
            raise CheckpointError(
                f"cannot resume from {path}: the config changes the model. Differing keys:\n  "
                + "\n  ".join(fatal)
                + "\nRestore these values, or start a new run in another run_dir (or checkpoint.overwrite=true moves "
                "the old run aside)."
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
    def weights_of(state: dict) -> dict | None:
        """The full weights of a step file, for `build_engine` to start from (None for a DCP checkpoint: its
        weights are loaded into the engine's own tensors by `restore`)."""
        return None if state.get("dcp") else state["model"]

    def restore(self, engine: Engine, state: dict, path: Path) -> list[str]:
        """Optimizer, scheduler (and DCP weights) into the built engine, and the RNG states; every rank calls it.
        The optimizer's hyper-parameters stay the ones this run's config built it with (a changed optim.lr or
        weight decay takes effect); only the schedule's position and the optimizer's moments come from the
        checkpoint. Returns notes for the log."""
        notes = []
        fresh = groups(engine)  # built from the current config
        if state.get("deepspeed_tag"):
            try:
                engine.load_native(RunDir.of_step_file(path).deepspeed_root, state["deepspeed_tag"])
            except (FileNotFoundError, NotImplementedError) as e:
                raise CheckpointError(f"cannot resume from {path}: {e}") from e
        elif state.get("dcp"):
            if "dcp" not in engine.checkpoint_formats:
                raise CheckpointError(
                    f"{path} is a DCP checkpoint; parallel.engine={engine.name} cannot load it (use none, ddp, fsdp "
                    "or a pipeline)"
                )
            load_dcp(engine.live_state(), RunDir.of_step_file(path).dcp_dir(state["dcp"]))
            engine.weights_loaded()  # rank 0's plain model gets the loaded weights at the next full_model()
            engine.scheduler.load_state_dict(state["scheduler"])
        else:
            if not engine.load_optimizer_state(state["optimizer"]):
                notes.append(f"{path} is a file checkpoint: {engine.name} takes its weights only (fresh optimizer)")
            engine.scheduler.load_state_dict(state["scheduler"])
        apply_hyperparameters(engine.optimizer, engine.scheduler, fresh)
        set_rng_state(state["rng"])
        return notes


def apply_hyperparameters(optimizer, scheduler, fresh: dict) -> None:
    """Put the current config's hyper-parameters (`fresh`, by group name) back on a restored optimizer, make them
    the scheduler's base, and set each group's lr for the schedule's restored position."""
    for group in optimizer.param_groups:
        group.update({k: v for k, v in fresh.get(group["name"], {}).items() if k != "lr"})
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:  # LambdaLR (build_scheduler's): lr = base * multiplier(position)
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


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
