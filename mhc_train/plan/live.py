"""Live tensor bytes, counted from the dispatcher: what `mhc-train plan` traces and what its tests measure.

`LiveBytes` is a `TorchDispatchMode` that records every storage an op returns (by a weak reference to the storage
object, so a storage is counted once however many views or saved-for-backward copies share it, and released when
the storage itself dies, not when the last Python tensor does) and keeps the running total and its peak. Two uses:

- **Measure** a real step on CPU (`measure_step`): the bytes already live when it starts (parameters, gradients,
  optimizer states, passed in as `baseline`) plus everything allocated during the step through the dispatcher.
- **Trace** one micro-batch on fake tensors (`trace_stage` in activations.py): the same counter under
  `FakeTensorMode`, where storages are metadata only, gives the bytes a real run would hold.

Notes:
1. DTensor outputs (FSDP2's sharded parameters and gradients) are counted by their local shard.
2. Tensors on the meta device hold no memory and are not counted (a fake tensor reports its fake device, and is).
   Storages allocated outside the dispatcher (a collective's internal staging, DeepSpeed's flat buffers made before
   the mode starts) are not seen; pass what lives before the step as `baseline`.
3. `exclude`: tensors alive before the mode starts (parameters): an op that returns a view of one (a weight's
   transpose) allocates nothing, so their storages are known from the start and never counted.
4. `tag(fn)`: a predicate on (op, inputs, output) whose matching outputs are also counted apart (e.g. autocast's
   weight copies), with their own running total at the overall peak.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _local(t: torch.Tensor) -> torch.Tensor:
    inner = getattr(t, "_local_tensor", None)  # DTensor
    return inner if isinstance(inner, torch.Tensor) else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors by their local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = _local(t).untyped_storage()
        key = s._cdata
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


class LiveBytes(TorchDispatchMode):
    """Running and peak bytes of the storages ops return while the mode is active (see the module docstring)."""

    def __init__(self, baseline: int = 0, tag=None, exclude=()):
        super().__init__()
        self.baseline, self.tag = baseline, tag
        self.live, self.peak = 0, 0
        self.tagged, self.tagged_at_peak = 0, 0
        self.grads = 0  # bytes of storages marked as gradients (`mark_grad`)
        self.peak_no_grads, self.tagged_at_peak_no_grads = 0, 0  # the peak of live - grads
        self._known: dict[int, list] = {}  # storage id -> [bytes, tagged, grad]
        for t in exclude:  # storages that live before the mode (in `baseline`): views of them are not new bytes
            self._known[_local(t).untyped_storage()._cdata] = [0, False, False]
        self._resize = None

    @property
    def total(self) -> int:
        return self.baseline + self.live

    @property
    def peak_total(self) -> int:
        return self.baseline + self.peak

    def reset_peak(self) -> None:
        self.peak, self.tagged_at_peak = self.live, self.tagged
        self.peak_no_grads, self.tagged_at_peak_no_grads = self.live - self.grads, self.tagged

    def _update_peaks(self) -> None:
        if self.live > self.peak:
            self.peak, self.tagged_at_peak = self.live, self.tagged
        if self.live - self.grads > self.peak_no_grads:
            self.peak_no_grads, self.tagged_at_peak_no_grads = self.live - self.grads, self.tagged

    def _add(self, entry: list, nbytes: int) -> None:
        entry[0] += nbytes
        self.live += nbytes
        self.tagged += nbytes if entry[1] else 0
        self.grads += nbytes if entry[2] else 0

    def _release(self, key: int) -> None:
        entry = self._known.pop(key, None)
        if entry is not None:
            self._add(entry, -entry[0])

    def _record(self, t: torch.Tensor, tagged: bool) -> None:
        if _local(t).device.type == "meta":  # a skeleton's shapes, no memory (fake tensors report their fake device)
            return
        s = _local(t).untyped_storage()
        key = s._cdata
        if key in self._known:
            return
        try:
            weakref.finalize(s, self._release, key)
        except TypeError:  # not weak-referenceable: cannot tell when it dies, so do not count it
            return
        self._known[key] = entry = [0, tagged, False]
        self._add(entry, s.nbytes())
        self._update_peaks()

    def mark_grad(self, t: torch.Tensor) -> None:
        """Count `t`'s storage as a gradient from now on (it then stays out of `peak_no_grads`)."""
        entry = self._known.get(_local(t).untyped_storage()._cdata)
        if entry is not None and not entry[2]:
            self.grads += entry[0]
            entry[2] = True

    def _resized(self, storage, nbytes: int) -> None:
        """FSDP2 frees and re-allocates unsharded parameters by resizing their storage in place (not an op)."""
        entry = self._known.get(storage._cdata)
        if entry is not None:
            self._add(entry, int(nbytes) - entry[0])
            self._update_peaks()

    def __enter__(self):
        original = self._resize = torch.UntypedStorage.resize_
        mode = self

        def resize_(storage, nbytes):
            out = original(storage, nbytes)
            mode._resized(storage, nbytes)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        tagged = bool(self.tag and outs and self.tag(func, args, outs[0]))
        for t in outs:
            self._record(t, tagged)
        return out


def state_bytes(modules, optimizer=None) -> int:
    """Bytes a rank holds between steps: parameters, gradients and optimizer states (by storage)."""
    tensors = []
    for m in modules:
        for p in m.parameters():
            tensors += [p, p.grad]
    if optimizer is not None:
        for st in optimizer.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return storage_bytes(tensors)


def measure_step(step, baseline: int) -> dict:
    """Run `step()` under `LiveBytes(baseline)`: {"peak": bytes, "start": baseline, "end": bytes live after}."""
    with LiveBytes(baseline) as mode:
        step()
    return {"peak": mode.peak_total, "start": baseline, "end": mode.total}
