"""The checkpoints of one run directory: listing, saving in the engine's format, retention, moving damaged ones aside.

The engine gives primitives (`mhc_train.parallel.Engine`: `checkpoint_formats`, by-name optimizer state, live DCP
tensors, a native format), the run directory gives the paths (`mhc_train.io.rundir.RunDir`), the format classes
(`formats.py`) move engine state in and out, and the manager decides what is written where and when old checkpoints
go. Choosing the resume point and checking it against the run is `resume.py`; the manager's `choose` / `read` /
`restore` are its entry points for the trainer. Saves are synchronous (every rank returns once the step file is
durable and verified), or with `checkpoint.async_save` (DCP) asynchronous: the shards are written in the background
(`background.py`) and the step file is committed, and retention applied, only once every rank's write finished and
was digested; `wait` finishes the save in flight (at most one). Each rank digests the shard files it wrote itself,
all ranks at once, and only the digests travel to rank 0 (`shard_digests`): rank 0 reads no other rank's shard at
save time.

A step file holds: step, RNG states (torch, CUDA, numpy, python), the data position (seed and next step: batches are
a function of them), the resolved config, the tokenizer reference, the scheduler, and the weights and optimizer state
in one of three formats (`checkpoint.format`). Sharded directories are complete before the step file that points at
them is renamed into place. Leftover temporaries are removed on the next save.

A synchronous save that fails on one rank (disk full writing a shard or the step file) fails on every rank at once:
after each phase the ranks exchange their outcome (`agree`, one small all-gather in place of the old barrier) and
every rank raises the same line, instead of the others waiting at their next collective until parallel.timeout_s.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

from mhc_train.checkpoint import integrity, resume, space
from mhc_train.checkpoint.background import BackgroundSaver
from mhc_train.checkpoint.errors import CheckpointError
from mhc_train.checkpoint.formats import FORMATS, Format, format_of, groups
from mhc_train.checkpoint.rng import rng_state, set_rng_state
from mhc_train.checkpoint.shared_verify import ShardCheck, follow
from mhc_train.checkpoint.stepfile import load_step_file, write_step_file
from mhc_train.config import CheckpointConfig
from mhc_train.io.log import get_logger
from mhc_train.io.rundir import RunDir
from mhc_train.parallel import DistInfo, Engine
from mhc_train.parallel.dist import broadcast_from_main, first_failure, gather_dicts

log = get_logger(__name__)


class CheckpointManager:
    """The checkpoints of one run directory: listing, atomic writes, retention, and engine state in and out."""

    def __init__(self, run_dir: str | Path | RunDir, cfg: CheckpointConfig, dist: DistInfo | None = None):
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.dir = self.run.checkpoints
        self.cfg = cfg
        self.dist = dist or DistInfo()
        self._chosen: tuple[Path, dict] | None = None  # the state `choose` verified and loaded (read uses it)
        self.background: BackgroundSaver | None = None  # checkpoint.async_save: the save in flight, if any

    load = staticmethod(load_step_file)

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
        """Every rank calls this. Sharded engine state first (all ranks), each rank's digests of its own shards, then
        rank 0's atomic step file holding `meta` (counters, RNG, config, ...), what points at the shards and their
        digests. With checkpoint.async_save (DCP) it returns once the state is staged; the step file follows when the
        write is complete (`save_async`). A save in flight is finished first."""
        self.wait()
        fmt = FORMATS[self.format_for(engine)]
        if self.cfg.async_save and fmt.name == "dcp":
            return self.save_async(engine, step, meta)
        saved, error = _attempt(lambda: self._save_shards(fmt, engine, step))
        self.agree(step, error, partial=self.run.tag(step))  # a collective: one rank's failure fails every rank now
        body, sharded = saved
        # a collective: rank 0 goes on only once every rank's shards are complete and digested
        files = self.shard_digests(fmt, sharded) if sharded is not None else None
        path = self.path_for(step)
        error = None
        if self.dist.is_main:
            if sharded is not None:
                body["shards"] = {"dir": str(sharded.relative_to(self.dir)), "files": files}
            state = {**body, **meta, "world_size": self.dist.world, "step": step, "rng": rng_state()}
            _, error = _attempt(lambda: self.write(step, state))
        self.agree(step, error)  # in place of a barrier: rank 0's failure to write the step file reaches every rank
        return path

    def agree(self, step: int, error: BaseException | None, partial: str | None = None) -> None:
        """Every rank, after a phase of a save (`error`: this rank's failure in it, if any): learn whether any rank
        failed, and if one did, raise on every rank at once, instead of leaving the others at the next collective
        until parallel.timeout_s. A CheckpointError (disk full, ...) is raised on every rank with the same line, the
        lowest failing rank's; any other exception is re-raised as it is on its rank (a bug keeps its traceback)
        and the other ranks raise a CheckpointError naming it. `partial`: the tag whose sharded directories no rank
        writes any more (removed before raising: nothing half-written stays; older checkpoints are untouched). A
        collective; alone, the error is raised as it is."""
        if self.dist.world == 1:
            if error is not None:
                raise error
            return
        failed = first_failure(None if error is None else self._one_line(step, error), self.dist)
        if failed is None:
            return
        if partial is not None:
            for d in self.run.sharded_dirs(partial):
                shutil.rmtree(d, ignore_errors=True)
        if error is not None and not isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(failed[1]) from error

    def _one_line(self, step: int, error: BaseException) -> str:
        """A failure as every rank raises it: a CheckpointError's own line, else the rank, the type and a line."""
        if isinstance(error, CheckpointError):
            return str(error)
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return f"checkpoint of step {step} failed on rank {self.dist.rank} ({type(error).__name__}: {first})"

    def _save_shards(self, fmt: Format, engine: Engine, step: int) -> tuple[dict, Path | None]:
        """`fmt.save`; disk full: one line naming the directory and the space the engine's state needs (one process:
        the partial directory is removed here; with several ranks by `agree`, once no rank writes there any more)."""
        tag = self.run.tag(step)
        try:
            return fmt.save(engine, self.run, tag)
        except BaseException as e:  # an OSError, or DCP's CheckpointException carrying one (every rank gets it)
            cause = space.no_space_cause(e)
            if cause is None:
                raise
            partial = [d for d in self.run.sharded_dirs(tag) if d.is_dir()]
            if self.dist.world == 1:
                for d in partial:
                    shutil.rmtree(d, ignore_errors=True)
            try:  # this rank's share of the state, times the ranks
                needed = space.state_nbytes(engine.live_state()) * self.dist.world
            except Exception:
                needed = None
            raise space.no_space_error(partial[0] if partial else self.path_for(step), needed, cause) from None

    def shard_digests(self, fmt: Format, sharded: Path) -> dict:
        """Every rank: digest the files of `sharded` that this rank wrote (`Format.writer_of`), in parallel with the
        others; rank 0 merges the digests and digests itself what no rank claimed (its own `.metadata`, a name that
        does not say its writer, a file another rank does not see), so the step file lists every file, as it did
        when rank 0 digested them all. {} on other ranks. A collective."""
        merged = gather_dicts(self.own_digests(fmt, sharded), self.dist)
        return self.complete_digests(sharded, merged) if self.dist.is_main else {}

    def own_digests(self, fmt: Format, sharded: Path) -> dict:
        """{file: [size, digest]} of the files of `sharded` this rank wrote."""
        mine = [rel for rel in integrity.files_under(sharded) if fmt.writer_of(rel) == self.dist.rank]
        return integrity.digest_files(sharded, mine)

    @staticmethod
    def complete_digests(sharded: Path, merged: dict) -> dict:
        """Rank 0: every rank's digests plus its own of the files no rank claimed, sorted by name."""
        rest = [rel for rel in integrity.files_under(sharded) if rel not in merged]
        return dict(sorted({**merged, **integrity.digest_files(sharded, rest)}.items()))

    # ---- asynchronous saves ------------------------------------------------------------------------------------
    def save_async(self, engine: Engine, step: int, meta: dict) -> Path:
        """Every rank: stage the engine's DCP state, start its write in the background, return the path the step
        file will have. What the step file records (scheduler, RNG, counters) is taken now, with the tensors."""
        fmt, tag = FORMATS["dcp"], self.run.tag(step)
        sharded = self.run.dcp_dir(tag)
        body = copy.deepcopy(fmt.body(engine, tag))
        record = copy.deepcopy({**meta, "world_size": self.dist.world, "step": step, "rng": rng_state()})
        if self.background is None:
            self.background = BackgroundSaver(self.dist.world)
        t0 = time.perf_counter()
        self.background.submit(
            engine.live_state(), sharded, lambda error: self.commit(fmt, sharded, {**body, **record}, error, t0)
        )
        return self.path_for(step)

    def commit(self, fmt: Format, sharded: Path, state: dict, error: str | None, t0: float) -> Path:
        """Every rank, on its background thread once its write finished (`error`: its failure, if any): digest its own
        files, learn every rank's outcome, and (rank 0) write the step file, then retention. A collective on the
        save's own group; raises CheckpointError on every rank if any rank failed (no step file is written)."""
        step, group = state["step"], self.background.group
        mine = {}
        if error is None:
            try:
                mine = self.own_digests(fmt, sharded)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        outcomes = gather_dicts({self.dist.rank: (error, mine)}, self.dist, group)  # rank 0: every rank's
        failed = [f"rank {r}: {e}" for r, (e, _) in sorted(outcomes.items()) if e]
        if not failed and self.dist.is_main:
            try:
                merged = {k: v for _, part in outcomes.values() for k, v in part.items()}
                files = self.complete_digests(sharded, merged)
                state["shards"] = {"dir": str(sharded.relative_to(self.dir)), "files": files}
                self.write(step, state)
            except Exception as e:
                failed = [f"rank 0: {type(e).__name__}: {str(e)[:300]}"]
        failed = broadcast_from_main(failed, self.dist, group)  # every rank learns the outcome
        if failed:
            raise CheckpointError(
                f"asynchronous checkpoint of step {step} failed ({failed[0]}); no step file was written, so the "
                f"previous checkpoint stays the resume point: check {sharded.parent} (space, permissions)"
            )
        if self.dist.is_main:
            log.info(f"checkpoint {self.path_for(step).name} committed: written and verified in the background in "
                     f"{time.perf_counter() - t0:.2f} s")  # fmt: skip
        return self.path_for(step)

    @property
    def in_flight(self) -> bool:
        return self.background is not None and self.background.in_flight

    def wait(self) -> Path | None:
        """Every rank: finish the save in flight (None if none); its step file's path, or its CheckpointError."""
        return self.background.wait() if self.background is not None else None

    def close(self) -> None:
        """Finish the save in flight (a failure is logged, not raised: the run is ending anyway) and release the
        staging buffers."""
        if self.background is None:
            return
        try:
            self.wait()
        except CheckpointError as e:
            log.warning(str(e))
        finally:
            self.background.close()
            self.background = None

    def write(self, step: int, state: dict) -> Path:
        """Rank 0: the step file, written as a hidden temporary with its digest footer, fsynced and renamed; read
        back and verified; then retention (which therefore never removes the newest verified checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.run.temp_files():  # left by a run killed mid-write (the run directory's lock is ours)
            stale.unlink(missing_ok=True)
        final = write_step_file(self.run.temp_file(step, os.getpid()), self.path_for(step), state)
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

    # ---- reading -----------------------------------------------------------------------------------------------
    def verify(self, path: Path, state: dict) -> int:
        """The step file's digest and every shard it lists; returns the bytes checked (CheckpointError if not)."""
        return format_of(state).verify(path, state)

    def choose(self, mode: str) -> tuple[Path | None, list[str]]:
        """Rank 0: the checkpoint to resume from for `checkpoint.resume` (`resume.choose`), and log lines. Every
        rank verifies its share of the candidates' shards meanwhile: the other ranks call `follow_choice`."""
        check = ShardCheck(self.dist)
        try:
            path, state, notes = resume.choose(self, mode, check.verify)
        finally:
            check.done()
        self._chosen = (path, state) if path is not None else None
        return path, notes

    def follow_choice(self) -> None:
        """Ranks other than 0, while rank 0 runs `choose`: verify this rank's share of each candidate's shards."""
        follow(self.dist)

    def read(self, path: Path, config: dict, tokenizer: dict) -> tuple[dict, list[str]]:
        """(state, allowed config changes) of the checkpoint at `path`, checked against this run's resolved config and
        tokenizer reference (`resume.check`); raises CheckpointError naming the problem and the fix."""
        chosen, self._chosen = self._chosen, None
        if chosen and chosen[0] == path:
            state = chosen[1]
        else:
            state = self.load(path, verify=False, trusted=not self.cfg.verify)
        return state, resume.check(state, path, config, tokenizer)

    @staticmethod
    def weights_of(state: dict) -> dict | None:
        """The full weights of a step file, for `build_engine` to start from (None for a DCP checkpoint: its
        weights are loaded into the engine's own tensors by `restore`)."""
        return format_of(state).start_weights(state)

    def restore(self, engine: Engine, state: dict, path: Path) -> list[str]:
        """Optimizer, scheduler (and DCP weights) into the built engine, and the RNG states; every rank calls it.
        The optimizer's hyper-parameters stay the ones this run's config built it with (a changed optim.lr or
        weight decay takes effect); only the schedule's position and the optimizer's moments come from the
        checkpoint. Returns notes for the log."""
        fresh = groups(engine)  # built from the current config
        notes = format_of(state).load(engine, state, path)
        resume.apply_hyperparameters(engine.optimizer, engine.scheduler, fresh)
        set_rng_state(state["rng"])
        return notes


def _attempt(fn):
    """(fn(), None), or (None, the exception) for an Exception or DCP's CheckpointException (a BaseException)."""
    try:
        return fn(), None
    except Exception as e:
        return None, e
    except BaseException as e:
        if type(e).__name__ != "CheckpointException":  # KeyboardInterrupt, SystemExit: as they are
            raise
        return None, e
