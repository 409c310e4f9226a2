"""The expert all-to-all of one micro-batch hidden behind the other micro-batch's compute, inside DualPipeV's
overlapped forward/backward pair (overlap.py, parallel.pp_overlap with parallel.ep > 1).

DeepSeek-V3's DualPipe cuts an overlapped pair into chunks (attention, dispatch, MLP, combine) and interleaves the
forward's chunks with the backward's, so that each all-to-all of one micro-batch runs while the other computes. Here
the chunk boundaries are the all-to-alls themselves, found at run time instead of written into the model:

- the two halves of the pair run as two coroutines, the forward on a helper thread, the backward on the calling
  thread (`Interleave.run`); exactly one of them runs at a time, passing a baton, so the issue order is a fixed
  function of the program (the same on every rank of the expert-parallel group, which must post its all-to-alls in
  the same order) and the arithmetic is the in-order pair's, op for op (gradients bit-identical);
- every all-to-all of expert parallelism goes through `dist._exchange`; while a pair runs, `dist` posts it async and
  calls `Interleave.hide(work, tag)`, which records POST, hands the baton to the other half, which issues its compute
  up to its own next all-to-all (or to its end), takes the baton back, waits the work and records WAIT. The forward
  of an MoE layer posts three (the token counts, the dispatch, the combine), its backward two (the combine's and the
  dispatch's reverse exchanges, run by autograd inside the backward walk, which is how the backward is chunked per
  layer without cutting the graph: the exchange nodes are the layer boundaries);
- on CUDA each half issues on its own stream (the thread's current stream: the forward's is the pair's forward
  stream, the backward's are the ones autograd picks); an NCCL all_to_all posted async runs on NCCL's stream, and
  `work.wait()` only orders the poster's stream after it (no host block), so the GPU runs the exchange beside the
  kernels the other half issues meanwhile. One host sync remains per dispatch: the received token counts are read
  to size the exchange (`tolist`); the other half's already-issued chunk keeps the GPU busy during it.
On CPU (gloo) the same order runs and the exchange of one half overlaps the other half's compute in gloo's worker
threads; the trace (`events`) is what tests check: each all-to-all posted before a compute chunk of the other half
and waited after it.
"""

from __future__ import annotations

import threading

import torch

from mhc_train.parallel.dist import set_all_to_all_waiter

F, B = "F", "B"


class Interleave:
    """One overlapped pair's two halves as alternating coroutines (see the module docstring). `labels`: {half: (stage,
    micro-batch)} for the trace; `events` (shared across pairs, capped) gets (kind, half, pair, stage, mb, tag, seq)
    with kind RUN (the half took the baton and computes), POST, WAIT, DONE."""

    def __init__(self, pair: int, labels: dict, events: list, limit: int = 4096):
        self.pair, self.labels, self.events, self.limit = pair, labels, events, limit
        self.cond = threading.Condition()
        self.turn, self.done, self.errors = F, set(), {}
        self.f_thread = None
        self.seq = {F: 0, B: 0}

    def _record(self, kind: str, half: str, tag=None, seq=None) -> None:
        if len(self.events) < self.limit:
            self.events.append((kind, half, self.pair, *self.labels[half], tag, seq))

    def _half_of_caller(self) -> str:
        """The forward runs on its own thread; anything else (the calling thread, autograd's device threads) is the
        backward."""
        return F if threading.current_thread() is self.f_thread else B

    def _take(self, half: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == half)
        self._record("RUN", half)

    def _give(self, half: str) -> None:
        """Hand the baton to the other half (unless it has finished) and block until it comes back."""
        other = B if half == F else F
        with self.cond:
            if other in self.done:
                return
            self.turn = other
            self.cond.notify_all()
        self._take(half)

    def hide(self, work, tag: str) -> None:
        """The waiter `dist` calls for a posted all-to-all: let the other half compute, then wait it."""
        half = self._half_of_caller()
        self.seq[half] += 1
        seq = self.seq[half]
        self._record("POST", half, tag, seq)
        self._give(half)
        work.wait()
        self._record("WAIT", half, tag, seq)

    __call__ = hide  # the waiter `dist` calls

    def before_post(self) -> None:
        """Called by `dist` before it posts an all-to-all: once the other half has failed, this half stops posting
        (raising here), so this rank posts no exchange out of the order its peers follow: they then wait, as without
        interleaving, until the collective timeout instead of pairing their exchanges with others."""
        other = B if self._half_of_caller() == F else F
        if other in self.errors:
            raise RuntimeError(
                f"overlapped pair {self.pair}: the other half failed; this half stops before its next all-to-all"
            )

    def _body(self, half: str, fn) -> None:
        self._take(half)
        try:
            fn()
        except BaseException as e:  # re-raised by `run` on the calling thread
            self.errors[half] = e
        finally:
            self._record("DONE", half)
            with self.cond:
                self.done.add(half)
                self.turn = B if half == F else F
                self.cond.notify_all()

    def run(self, forward, backward) -> None:
        """Run `forward()` (on a helper thread, under the caller's grad mode and autocast) and `backward()` (here),
        interleaved at their all-to-alls; the forward starts."""
        state = _thread_state()

        def f_body():
            with _restored(state):
                self._body(F, forward)

        self.f_thread = threading.Thread(target=f_body, name="mhc-overlap-forward", daemon=True)
        previous = set_all_to_all_waiter(self)
        try:
            self.f_thread.start()
            self._body(B, backward)
            self.f_thread.join()
        finally:
            set_all_to_all_waiter(previous)
        for half in (F, B):
            if half in self.errors:
                raise self.errors[half]


def _thread_state() -> dict:
    """The calling thread's state a forward depends on (grad mode, autocast, CUDA device): thread-local in torch."""
    state = {"grad": torch.is_grad_enabled(), "autocast": []}
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            state["autocast"].append((device, torch.get_autocast_dtype(device)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_device"] = torch.cuda.current_device()
    return state


class _restored:
    """Re-enter `_thread_state`'s state on another thread."""

    def __init__(self, state: dict):
        self.state, self.stack = state, []

    def __enter__(self):
        if "cuda_device" in self.state:
            torch.cuda.set_device(self.state["cuda_device"])
        self.stack = [torch.set_grad_enabled(self.state["grad"])]
        for device, dtype in self.state["autocast"]:
            self.stack.append(torch.autocast(device, dtype=dtype))
        for ctx in self.stack:
            ctx.__enter__()
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self.stack):
            ctx.__exit__(*exc)
        return False


def hidden_all_to_alls(events) -> tuple[int, int]:
    """(all-to-alls posted before a compute chunk of the other half of their pair and waited after it, all-to-alls
    posted) in `Interleave` events."""
    hidden = posted = 0
    for i, ev in enumerate(events):
        if ev[0] != "POST":
            continue
        posted += 1
        for later in events[i + 1 :]:
            if later[0] == "WAIT" and later[1:] == ev[1:]:
                break
            if later[0] == "RUN" and later[1] != ev[1] and later[2] == ev[2]:
                hidden += 1
                break
    return hidden, posted
