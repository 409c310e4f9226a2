"""Resuming: choosing the checkpoint to resume from, checking it against the run, and re-applying today's
hyper-parameters to the restored optimizer.

- `choose`: `checkpoint.resume=auto` takes the newest checkpoint that verifies (damaged newer ones are moved aside to
  `checkpoints/damaged/`, never deleted; none verifying is an error, never a silent fresh start). A newer step file
  without a digest footer (truncated, emptied, its footer damaged) is damaged too once an older one verifies; when
  none verifies it may predate digests, and is left in place with the `checkpoint.verify=false` advice. An explicit
  file is verified and never replaced; resuming an older checkpoint of the same run moves the newer ones to
  `superseded/`.
- `check`: the saved config against this run's under the compatibility rule (`compat.py`: a change of the model is
  fatal, naming every differing key), and the tokenizer's sha256.
"""

from __future__ import annotations

import time
from pathlib import Path

from mhc_train.checkpoint.compat import compare_configs, drop_removed
from mhc_train.checkpoint.errors import CheckpointError, CorruptCheckpoint, UnverifiableCheckpoint
from mhc_train.checkpoint.integrity import verify_shards


def load_verified(manager, path: Path, check_shards=verify_shards) -> tuple[dict, str]:
    """Load the step file with its digest checked alongside, then verify its shards (`check_shards(directory,
    files)`: every rank its share, `shared_verify.ShardCheck`); returns (state, a log line with the cost)."""
    t0, timings = time.perf_counter(), {}
    if not manager.cfg.verify:
        state = manager.load(path, verify=False, trusted=True)
        return state, f"loaded {path.name} unverified (checkpoint.verify=false) in {time.perf_counter() - t0:.3f} s"
    state = manager.load(path, timings=timings)
    load_s, nbytes, verify_s = time.perf_counter() - t0, timings["bytes"], timings["seconds"]
    shards = state.get("shards")
    if shards:
        t1 = time.perf_counter()
        try:
            nbytes += check_shards(path.parent / shards["dir"], shards["files"])
        except CheckpointError as e:
            raise CorruptCheckpoint(str(e)) from None
        verify_s += time.perf_counter() - t1
    mib = nbytes / 2**20
    world = getattr(getattr(check_shards, "__self__", None), "world", 1)  # ShardCheck.verify: shared by the ranks
    share = f" (rank 0's share; {world} ranks verified theirs)" if shards and world > 1 else ""
    line = (
        f"verified {path.name}{' and its shards' if shards else ''}{share}: {mib:,.1f} MiB in {verify_s:.3f} s "
        f"({mib / max(verify_s, 1e-9):,.0f} MiB/s; the step file's load, alongside, took {load_s:.3f} s)"
    )
    return state, line


def choose(manager, mode: str, check_shards=verify_shards) -> tuple[Path | None, dict | None, list[str]]:
    """Rank 0: (path, its verified state, log lines) of the checkpoint to resume from for `checkpoint.resume`."""
    if mode == "never":
        return None, None, []
    if mode != "auto":
        path = Path(mode)
        state, line = load_verified(
            manager, path, check_shards
        )  # raises on damage: an explicit choice is never replaced
        notes = [line]
        if path.resolve().parent == manager.dir.resolve():  # an older checkpoint of this run: the newer ones belong
            for step, newer in manager.complete():  # to a timeline this resume abandons; keep them, out of the way
                if step > state["step"]:
                    notes.append(f"resuming from step {state['step']}: moved the newer {newer.name} aside to "
                                 f"{manager.move_aside(newer, 'superseded')}")  # fmt: skip
        return path, state, notes
    notes, unverifiable = [], []
    for _, path in reversed(manager.complete()):
        try:
            state, line = load_verified(manager, path, check_shards)
        except UnverifiableCheckpoint as e:  # truncated, emptied, footer damaged, or older than digests
            unverifiable.append((path, e))
            continue
        except CorruptCheckpoint as e:
            dest = manager.move_aside(path)
            notes.append(f"{e}; moved it aside to {dest}")
            continue
        for bad, _ in unverifiable:  # an older checkpoint verifies: the newer footerless ones are damaged, not old
            notes.append(f"checkpoint {bad} has no integrity footer (truncated, emptied or its footer damaged); "
                         f"moved it aside to {manager.move_aside(bad)}")  # fmt: skip
        if notes:
            notes.append(f"resuming from {path} instead, the newest checkpoint that verifies")
        return path, state, [*notes, line]
    if unverifiable and not notes:  # none verifies, some carry no footer (maybe written before digests): as before
        raise unverifiable[0][1]
    if notes or unverifiable:  # there were checkpoints and none verifies: never start over silently
        notes += [str(e) for _, e in unverifiable]
        raise CorruptCheckpoint(
            "\n".join(notes) + f"\nno checkpoint in {manager.dir} verifies, so none was loaded: restore one from a "
            "backup (checkpoint.resume=<file>), or start over in another run_dir"
        )
    return None, None, notes


def check(state: dict, path: Path, config: dict, tokenizer: dict) -> list[str]:
    """The allowed config changes of resuming `state` (from `path`) under this run's resolved `config` and
    `tokenizer` reference; raises CheckpointError naming the problem and the fix."""
    fatal, allowed = compare_configs(drop_removed(state["config"], f"checkpoint {path}"), config)
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
    return allowed


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
