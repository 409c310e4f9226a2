"""DualPipeV's overlapped forward/backward pair (`OVERLAP_F_B`), run by our own function.

torch's DualPipeV schedule emits `OVERLAP_F_B` actions: the forward of one micro-batch on one of the rank's two
stages, paired with the full backward of another micro-batch on the other stage. torch's runtime runs the pair in
order on one stream. `OverlapFB` replaces that handler (`schedule.register_custom_function`, a private API of the
pinned torch) and on CUDA actually overlaps the pair:

- the two halves run on different streams: autograd runs a backward on the stream its forward ran on, so the handler
  puts each overlapped forward on the stream its paired backward does not use (it records which stream every
  micro-batch's forward ran on: the current one for the runtime's own F actions, then alternating); the forward is
  enqueued first and the backward right after it, with no host sync in between, so the GPU runs the two micro-batches'
  kernels concurrently in steady state (`trace` records the assignment; tests check it on CPU);
- the forward's boundary output (the stream state the next stage, on another rank, waits for) is sent as soon as the
  forward has produced it, from inside the pair and before the backward is enqueued, on the forward's stream, instead
  of after the whole pair returns (the runtime's `SEND_F` action that follows the pair then finds nothing left to
  send for that micro-batch; `finish` waits the sends at the end of the step, as the runtime waits its own);
- during that forward every FFN site's `post_res` (the `H_res x + H_post^T y` merge that produces the next stream
  state, i.e. the tensor the next stage waits for) runs on a high-priority stream (`priority=-1`), so the backward's
  long GEMMs do not delay the hand-off; the backward of those ops follows them onto that stream (autograd runs a
  backward op on its forward op's stream). The FFN sites get the priority runner once, when the engine is built
  (`Site.run_post_res_through`); it is active only inside an overlapped forward and calls the op directly elsewhere.
- with expert parallelism (parallel.ep > 1, `interleave_a2a`) the two halves are interleaved at their expert
  all-to-alls (overlap_ep.py: DeepSeek-V3's attention / dispatch / MLP / combine chunking): each exchange of one
  micro-batch is posted async and waited only after the other micro-batch has issued its next compute chunk; both
  halves' receives are waited before the pair starts, as torch's in-order pair does.
On CPU there are no streams: the same function runs the forward, then the backward, in order (what CI checks), or,
with expert parallelism, the interleaved halves in their fixed issue order (`a2a_events`, checked by tests).

Bookkeeping the runtime would do for the pair, done here (torch's `_PipelineScheduleRuntime._step_microbatches`,
FORWARD and FULL_BACKWARD branches): wait the matching receives, forward one chunk, compute the loss on the last
stage, hand the V turn-around input to the local next stage, count backwards and flag the last one (gradient
reduction), backward one chunk, hand the input gradient to the local previous stage.

Stream safety (CUDA caching allocator): every pair starts with `side.wait_stream(current)` and ends with
`current.wait_stream(side)`; within a pair all side/priority allocations are enqueued before the
backward frees anything, so a block freed by the backward is reused on a side stream only after the next region's
wait. Outputs made on the priority stream are `record_stream`ed on the stream that consumes them.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from mhc_train.parallel.overlap_ep import Interleave


class _PriorityRunner:
    """While `active`: runs one op on the priority stream, ordered after the current stream's work, and orders the
    current stream after it (on CPU, with no stream, it just calls the op) and counts the call (checked by tests and
    reported after the first step). Inactive, it calls the op directly."""

    def __init__(self, stream):
        self.stream, self.calls, self.active, self.thread = stream, 0, False, None

    @contextlib.contextmanager
    def activated(self):
        self.active, self.thread = True, threading.get_ident()
        try:
            yield
        finally:
            self.active = False

    def __call__(self, fn, *args, **kwargs):
        if not self.active or threading.get_ident() != self.thread:  # only the overlapped forward's own ops
            return fn(*args, **kwargs)
        self.calls += 1
        if self.stream is None:
            return fn(*args, **kwargs)
        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            out = fn(*args, **kwargs)
        out.record_stream(cur)
        cur.wait_stream(self.stream)
        return out


def _assert_unsharded(sched, stage) -> None:
    """The runtime's FSDP check before computing on a stage; its argument was a stage index in older torch."""
    check = getattr(sched, "_assert_unsharded", None)
    if check is None:
        return
    first = next(iter(inspect.signature(check).parameters), "stage")
    check(stage.stage_index if first == "stage_idx" else stage)


class OverlapFB:
    """The `OVERLAP_F_B` handler: `schedule.register_custom_function(OVERLAP_F_B, OverlapFB(device))`."""

    def __init__(self, device: torch.device | str, interleave_a2a: bool = False):
        device = torch.device(device)
        self.interleave_a2a = interleave_a2a  # expert parallelism: the halves interleaved at their all-to-alls
        self.a2a_events: list[tuple] = []  # `overlap_ep.Interleave`'s trace of the first pairs
        self.cuda = device.type == "cuda"
        if self.cuda:
            greatest = torch.cuda.Stream.priority_range()[1]  # (least, greatest); greater priority is more negative
            self.side = torch.cuda.Stream(device)
            self.runner = _PriorityRunner(torch.cuda.Stream(device, priority=max(greatest, -1)))
        else:
            self.side, self.runner = None, _PriorityRunner(None)
        self.pairs = 0
        self.stream_of: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> stream its forward ran on
        self.trace: list[tuple] = []  # the first pairs: (pair, F stage, F mb, F stream, B stage, B mb, B stream)
        self.events: list[tuple] = []  # issue order of the first pairs: (kind F|SEND_F|B, stage, mb, stream)
        self.early_sends = 0
        self._sent: set[tuple[int, int]] = set()  # (stage, mb) whose forward output already went out
        self._works: list = []  # the early sends' requests, waited by `finish`

    def _record(self, *event) -> None:
        if len(self.events) < 1024:
            self.events.append(event)

    def wrap_send_ops(self, stage) -> None:
        """The runtime's SEND_F for a micro-batch this handler already sent becomes a no-op (no second send)."""
        original = stage.get_fwd_send_ops

        def get_fwd_send_ops(mb: int):
            if (stage.stage_index, mb) in self._sent:
                self._sent.remove((stage.stage_index, mb))
                return []
            return original(mb)

        stage.get_fwd_send_ops = get_fwd_send_ops

    def finish(self) -> None:
        """Wait this step's early sends (call after every schedule step)."""
        for work in self._works:
            work.wait()
        self._works.clear()

    CURRENT, SIDE = 0, 1

    def _on(self, stream: int):
        """Enqueue on the current stream (0) or the side stream (1); on CPU there are no streams."""
        if not self.cuda or stream == self.CURRENT:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.side)

    def __call__(self, action, ctx) -> None:
        from torch.distributed.pipelining.schedules import _wait_batch_p2p

        sched = ctx.schedule_ref
        fwd, bwd = action.sub_actions
        stages = {s.stage_index: s for s in sched._stages}
        self.pairs += 1
        # the backward will run where its forward ran; the forward goes on the other stream
        b_stream = self.stream_of.pop((bwd.stage_index, bwd.microbatch_index), self.CURRENT)
        f_stream = self.SIDE if b_stream == self.CURRENT else self.CURRENT
        self.stream_of[(fwd.stage_index, fwd.microbatch_index)] = f_stream
        if len(self.trace) < 256:
            self.trace.append((self.pairs, fwd.stage_index, fwd.microbatch_index, f_stream, bwd.stage_index,
                               bwd.microbatch_index, b_stream))  # fmt: skip
        if self.interleave_a2a:  # both receives first (as torch's in-order pair), waited on the current stream ...
            if not stages[fwd.stage_index].is_first and fwd.stage_index - 1 not in stages:
                _wait_batch_p2p(sched.fwd_recv_ops.pop((fwd.stage_index, fwd.microbatch_index)))
            if not stages[bwd.stage_index].is_last and bwd.stage_index + 1 not in stages:
                _wait_batch_p2p(sched.bwd_recv_ops.pop((bwd.stage_index, bwd.microbatch_index)))
        if self.cuda:  # ... so the side stream, ordered after the current one here, also sees the received buffers
            self.side.wait_stream(torch.cuda.current_stream())
        if not self.interleave_a2a:  # the forward, then the backward
            self._forward(sched, ctx, stages, fwd, f_stream, wait_recv=True)
            self._backward(sched, stages, bwd, b_stream, wait_recv=True)
        else:  # the halves interleaved at their all-to-alls
            labels = {"F": (fwd.stage_index, fwd.microbatch_index), "B": (bwd.stage_index, bwd.microbatch_index)}
            stream = torch.cuda.current_stream() if self.cuda else None  # a new thread starts on the default stream
            Interleave(self.pairs, labels, self.a2a_events).run(
                lambda: self._forward(sched, ctx, stages, fwd, f_stream, wait_recv=False, current=stream),
                lambda: self._backward(sched, stages, bwd, b_stream, wait_recv=False),
            )
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.side)

    def _forward(self, sched, ctx, stages, fwd, f_stream, wait_recv: bool, current=None) -> None:
        """The pair's forward of micro-batch fwd.microbatch_index on its stage, on stream `f_stream`, and its early
        send."""
        from torch.distributed.pipelining.schedules import _batch_p2p, _wait_batch_p2p

        stage, mb = stages[fwd.stage_index], fwd.microbatch_index
        _assert_unsharded(sched, stage)
        on = self._on(f_stream) if current is None or f_stream == self.SIDE else torch.cuda.stream(current)
        with on:
            if wait_recv and not stage.is_first and fwd.stage_index - 1 not in stages:
                _wait_batch_p2p(sched.fwd_recv_ops.pop((fwd.stage_index, mb)))
            with self.runner.activated():
                out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=True)
            self._record("F", fwd.stage_index, mb, f_stream)
            sched._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
            if fwd.stage_index + 1 in stages:  # the V turn-around: the next stage lives on this rank
                stages[fwd.stage_index + 1].set_local_fwd_input(out, mb)
            elif not stage.is_last:  # the next stage is on another rank: send now, before the backward
                self._works.extend(_works(_batch_p2p(stage.get_fwd_send_ops(mb))))
                self._sent.add((fwd.stage_index, mb))
                self.early_sends += 1
                self._record("SEND_F", fwd.stage_index, mb, f_stream)

    def _backward(self, sched, stages, bwd, b_stream, wait_recv: bool) -> None:
        """The pair's full backward of micro-batch bwd.microbatch_index on the other stage (on b_stream, where
        autograd runs it)."""
        from torch.distributed.pipelining.schedules import _wait_batch_p2p

        stage, mb = stages[bwd.stage_index], bwd.microbatch_index
        _assert_unsharded(sched, stage)
        if wait_recv and not stage.is_last and bwd.stage_index + 1 not in stages:
            _wait_batch_p2p(sched.bwd_recv_ops.pop((bwd.stage_index, mb)))
        loss = sched._maybe_get_loss(stage, mb)
        sched.backward_counter[bwd.stage_index] += 1
        last = sched.backward_counter[bwd.stage_index] == sched._n_microbatches
        self._record("B", bwd.stage_index, mb, b_stream)
        stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
        if bwd.stage_index - 1 in stages:
            stages[bwd.stage_index - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)


def _works(result) -> list:
    """`_batch_p2p`'s requests as a list: torch returns a list of Works today, one Work (or None for no ops) in older
    releases such as the lent GPU machine's 2.11."""
    if result is None:
        return []
    return list(result) if isinstance(result, (list, tuple)) else [result]


def issue_order(events, limit: int = 16) -> str:
    """The first `limit` issued events as `F0.2@1 SEND_F0.2@1 B3.0@0` (kind, stage.micro-batch, @stream)."""
    return " ".join(f"{kind}{stage}.{mb}@{stream}" for kind, stage, mb, stream in events[:limit])


def install_overlap(schedule, modules, device, interleave_a2a: bool = False) -> OverlapFB:
    """Install `OverlapFB` as the schedule's OVERLAP_F_B handler and route the FFN sites' post_res of the stage
    `modules` through its priority runner; returns it (its counters feed logs and tests). `interleave_a2a`: expert
    parallelism's all-to-alls of each half hidden behind the other half's compute (overlap_ep.py)."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B

    handler = OverlapFB(device, interleave_a2a)
    schedule.register_custom_function(OVERLAP_F_B, handler)
    for stage in schedule._stages:
        handler.wrap_send_ops(stage)
    for module in modules:
        for layer in module.layers.values():
            layer.ffn_conn.run_post_res_through(handler.runner)
    return handler
