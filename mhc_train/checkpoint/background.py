"""Asynchronous DCP saves (`checkpoint.async_save`): the shards are written in the background while training goes on,
and the checkpoint is committed (digested, step file written, retention) only once every rank's write finished.

- Staging: the live tensors are copied to host memory before `async_save` returns (pinned memory on CUDA, plain on
  CPU), so the next optimizer steps never change what is being written. The stager is kept for the run (its pinned
  buffers are reused) and closed with it.
- A dedicated gloo group carries the save's own collectives (DCP's planning, the digests' gather, the commit's
  outcome): the background thread never interleaves collectives with the training's on the default group.
- The commit runs on one background thread per rank after DCP's write: each rank digests the files it wrote, every
  rank learns every rank's outcome (one failure anywhere fails the save everywhere, with one line naming it), and
  rank 0 writes the step file (atomically, verified) and only then applies retention. A crash or a failure before
  that leaves no step file: the previous checkpoint stays the resume point.
- At most one save is in flight: the next save, the end of the run, a preemption and an exception wait for it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist


def make_stager():
    """The stager: the state copied to host memory at submission (pinned on CUDA)."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(cuda, False, False, cuda))


def checkpoint_group(world: int):
    """A gloo group of every rank for the background save's collectives (None alone). A collective itself."""
    if world == 1 or not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


class BackgroundSaver:
    """One save in flight at a time: `submit` stages and starts DCP's write, then runs `commit(error)` on this rank's
    background thread once the write finished (error: the write's exception text, None on success); `wait` returns
    the commit's result, raising its exception."""

    def __init__(self, world: int):
        self.world, self.group, self.stager = world, None, None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mhc-checkpoint")
        self.pending: Future | None = None

    def submit(self, state: dict, directory, commit) -> None:
        import torch.distributed.checkpoint as dcp

        if self.stager is None:  # first save: every rank is here together (the group's creation is a collective)
            self.group, self.stager = checkpoint_group(self.world), make_stager()
        written = dcp.async_save(
            state, checkpoint_id=str(directory), process_group=self.group, async_stager=self.stager
        )
        written = getattr(written, "upload_completion", written)  # an AsyncSaveResponse where staging is async

        def after_write():
            try:
                written.result()
                error = None
            except Exception as e:  # every rank still takes part in the commit's collectives
                error = f"{type(e).__name__}: {str(e)[:300]}"
            return commit(error)

        self.pending = self.pool.submit(after_write)

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    def wait(self):
        """The in-flight save's commit result (None if none); raises what the commit raised."""
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.stager is not None:
            self.stager.close()
            self.stager = None
