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
backward) and dh_post / dh_res (post_res's backward), so autograd always runs both before it. The owner still
checks that every op that joined the link in forward has handed over, and fails loudly if one has not.
On CUDA the hand-off bypasses autograd's stream bookkeeping, so `give` records an event on the producing stream
and `take` makes the consuming stream wait for it and marks the tensors as used there (the producing op may run on
a side stream: DualPipeV's overlapped post_res).
"""

from __future__ import annotations

import torch


class SiteLink:
    """The backward hand-off of one site (see the module docstring). Forward: ops `join`; backward: they `give`,
    the owner `take`s."""

    def __init__(self):
        self.joined: set[str] = set()
        self._given: dict[str, tuple] = {}
        self._events: dict[str, torch.cuda.Event] = {}

    def join(self, op: str) -> None:
        if op in self.joined:
            raise RuntimeError(f"SiteLink: {op} joined twice; a link serves one site (make one per site call)")
        self.joined.add(op)

    def give(self, op: str, *tensors) -> None:
        self._given[op] = tensors
        if any(t is not None and t.is_cuda for t in tensors):
            event = torch.cuda.Event()
            event.record()
            self._events[op] = event

    def take(self, op: str) -> tuple:
        """The tensors `op` gave (None each if op never joined); raises if op joined but has not given yet."""
        if op not in self.joined:
            return (None, None)
        if op not in self._given:
            raise RuntimeError(
                f"SiteLink: {op}'s backward has not run before the site's projection backward; the site's "
                "coefficients must feed every op of the site (do not detach h_pre/h_post/h_res)"
            )
        tensors = self._given.pop(op)
        event = self._events.pop(op, None)
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in tensors:
                if t is not None and t.is_cuda:
                    t.record_stream(stream)
        return tensors
