"""One dx per connection site: the backward hand-off between a site's kernels.

A site reads x three times (projection, pre, post_res), so autograd would receive three [T, n, C] gradients for x
and add them: three writes, two reads and two adds of the stream-sized tensor. The paper's fused backward writes
one. Here the stream ops of a site share a `SiteLink`:

    h, link = mhc_projection(x, phi, link=SiteLink())      # the link's owner: its backward writes the one dx
    f_in    = mhc_pre(x, h_pre, link=link)                  # backward: dh_pre only; hands over (dF_in, h_pre)
    out     = mhc_post_res(x, y, h_post, h_res, link=link)  # backward: dy, dh_post, dh_res; hands over (g, h_res)

pre and post_res return no gradient for x; the projection's backward kernel writes
`dx = H_res^T g + h_pre (x) dF_in + (the projection's own term)`, reading g and dF_in once each.

Why the order is safe: the projection's backward needs dh, which the gates' backward computes from dh_pre (pre's
backward) and dh_post / dh_res (post_res's backward), so within one backward call autograd runs both before it
whenever they run at all. pre and post_res refuse, at forward, a link whose coefficients do not require grad (a
detached coefficient would break that order). Each hand-over is tagged with its backward call (autograd's graph
task id): an op that did not run in this call (`grad(f_in, x)`, or an earlier retain_graph call) contributes
nothing, never a stale term. Tensors are handed over detached and only when x's gradient is needed, and an owner
call that needs no dx clears the link: nothing is parked, and link -> tensor -> graph -> link never forms a cycle.
On CUDA the hand-off bypasses autograd's stream bookkeeping, so `give` records an event on the producing stream
and `take` makes the consuming stream wait for it and marks the tensors as used there (the producing op may run on
a side stream: DualPipeV's overlapped post_res).
"""

from __future__ import annotations

import torch


class SiteLink:
    """The backward hand-off of one site (see the module docstring). Forward: ops `join`; backward: they `give`,
    the owner `take`s (or `drop`s)."""

    def __init__(self):
        self.joined: set[str] = set()
        self._given: dict[str, tuple] = {}  # op -> (graph task id, tensors)
        self._events: dict[str, torch.cuda.Event] = {}

    def join(self, op: str) -> None:
        if op in self.joined:
            raise RuntimeError(f"SiteLink: {op} joined twice; a link serves one site (make one per site call)")
        self.joined.add(op)

    def give(self, op: str, *tensors) -> None:
        # detached: a saved h_pre / h_res keeps its grad_fn, and link -> tensor -> graph -> ctx -> link is a cycle
        tensors = tuple(None if t is None else t.detach() for t in tensors)
        self._given[op] = (torch._C._current_graph_task_id(), tensors)
        if any(t is not None and t.is_cuda for t in tensors):
            event = torch.cuda.Event()
            event.record()
            self._events[op] = event

    def take(self, op: str) -> tuple:
        """The tensors `op` gave in this backward call; (None, None) if it did not run in this call (no term)."""
        entry = self._given.pop(op, None)
        event = self._events.pop(op, None)
        if entry is None or entry[0] != torch._C._current_graph_task_id():
            return (None, None)
        tensors = entry[1]
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in tensors:
                if t is not None and t.is_cuda:
                    t.record_stream(stream)
        return tensors

    def drop(self) -> None:
        """Forget what was handed over (an owner call that needs no dx)."""
        self._given.clear()
        self._events.clear()


def check_linked(link: SiteLink | None, x: torch.Tensor, **coefficients) -> None:
    """Refuse at forward a linked op whose coefficients cannot carry the order the link relies on (see above)."""
    if link is None or not (torch.is_grad_enabled() and x.requires_grad):
        return
    loose = [name for name, c in coefficients.items() if c is not None and not c.requires_grad]
    if loose:
        raise ValueError(
            f"SiteLink: {', '.join(loose)} do(es) not require grad while x does; a linked site needs coefficients "
            "computed from x (do not detach them), or call the op without link="
        )
