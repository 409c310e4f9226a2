"""Shared launch helpers for the mHC Triton kernels: input checks, block sizes, and one `launch` every launcher uses.

- `launch(kernel, grid, writes=..., num_warps=..., num_stages=..., **args)` runs a kernel; inside `capture()` it also
  records the launch (kernel, grid, arguments, launch options, which tensors it writes), and skips running it when
  the tensors live on the `meta` device. The compile gate (`mhc_kernels/aot.py`, `scripts/check_kernels.py`) compiles
  exactly the recorded specializations ahead of time; the traffic audit (`scripts/bench_kernels.py`) counts bytes
  from the recorded tensor arguments. One code path, so the gate and the audit see what users run.
- Launch options (num_warps, num_stages) are chosen per shape by each launcher; the interpreter ignores them.
- `launch_tuned(kernel, grid_of, candidates, key=..., ...)`: a small autotune set, opt-in with MHC_AUTOTUNE=1. Then
  on CUDA the first call per key times every candidate config (Triton's do_bench, median) and keeps the fastest
  for the process. Off by default because the candidates round differently (another reduction order) and the
  choice follows timing: two ranks or a restart could take different numeric paths, and do_bench synchronises the
  device in the middle of a step (unsafe under pipeline schedules with point-to-point traffic in flight). Without
  it, and in the interpreter and on `meta` tensors, the first candidate runs (the launcher's rule for that shape).
  The compile gate compiles every candidate (`capture(alternates=True)`); the audit counts the bytes of the first
  only (every candidate moves the same tensors).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1 must be set before `import triton`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument used as a loop bound (`range(0, C, BLOCK_C)`) into a
    Python int with `int(array)` on a 1-element array, which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be
    converted to Python scalars"): every kernel with such a loop failed under TRITON_INTERPRET=1. Later Triton (3.9)
    squeezes the array first; this re-sets `__index__` that way after the interpreter's own patching, so the same
    kernels run on both. A no-op where Triton already squeezes; left alone if the hook is not there."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mhc_index_fix", False):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None:  # restored with the interpreter's other patches after the launch
            scope.set_attr(tensor, "__index__", index)
        else:  # older Triton patches tl.tensor for good
            tensor.__index__ = index

    patch_lang_tensor._mhc_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _patch_interpreter_index()


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def tokens_per_block(values_per_token: int) -> int:
    """Tokens per program for the per-token coefficient kernels: about 2k values per program, at most 64 tokens."""
    return max(1, min(64, 2048 // values_per_token))


def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (132 on an H100 SXM when there is none: launch sizing only)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


MAX_STREAMS = 16  # n above this is refused here (the ops layer then takes the torch path); tested for n in 1..16
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Launch:
    """One recorded kernel launch: enough to compile it ahead of time and to count its memory traffic."""

    kernel: object  # the @triton.jit function (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: dict  # parameter name -> value (tensors, ints, floats, constexprs)
    writes: tuple[str, ...]  # names of the tensor arguments the kernel writes (the others are read)
    options: dict = field(default_factory=dict)  # num_warps, num_stages

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def bytes_moved(self) -> tuple[int, int]:
        """(read, written) bytes: every tensor argument once, as a kernel that streams its operands would move them.
        Re-reads that a cache absorbs (phi, coefficient rows) are not counted twice; atomics count as writes. A tensor
        passed twice (an unused pointer filled with another argument, its use switched off at compile time) counts
        once, under its first name."""
        read = written = 0
        seen: set[int] = set()
        for name, value in self.args.items():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                size = value.numel() * value.element_size()
                if name in self.writes:
                    written += size
                else:
                    read += size
        return read, written


_captured: list[Launch] | None = None
_alternates = False  # capture also the candidates launch_tuned did not pick (the compile gate wants them all)


@contextlib.contextmanager
def capture(alternates: bool = False):
    """Record every `launch` inside the block: `with capture() as launches: op(x_meta, ...)`. On `meta` tensors nothing
    runs (outputs stay uninitialised), so any shape can be captured on a machine without a GPU. `alternates=True`
    also records every other candidate config of a `launch_tuned` (recorded, never run)."""
    global _captured, _alternates
    previous, _captured = (_captured, _alternates), []
    _alternates = alternates
    try:
        yield _captured
    finally:
        _captured, _alternates = previous


def capturing() -> bool:
    return _captured is not None


def launch(kernel, grid, *, writes: tuple[str, ...], num_warps: int = 4, num_stages: int = 2, **args) -> None:
    """Run `kernel[grid](**args)` with the given launch options (recorded too inside `capture()`)."""
    grid = tuple(int(g) for g in grid)
    if _captured is not None:
        _captured.append(
            Launch(kernel, grid, dict(args), tuple(writes), dict(num_warps=num_warps, num_stages=num_stages))
        )
        if any(isinstance(v, torch.Tensor) and v.device.type == "meta" for v in args.values()):
            return
    if interpreting():
        kernel[grid](**args)
    else:
        kernel[grid](**args, num_warps=num_warps, num_stages=num_stages)


_tuned: dict[tuple, int] = {}  # (kernel name, key) -> index of the fastest candidate, per process


def _tunes(args: dict) -> bool:
    """Tune on CUDA tensors with the real compiler, when MHC_AUTOTUNE=1 (see the module docstring for why not by
    default: benchmarks and single-GPU exploration, not reproducible or pipelined training)."""
    on_gpu = any(isinstance(v, torch.Tensor) and v.is_cuda for v in args.values())
    return on_gpu and not interpreting() and os.environ.get("MHC_AUTOTUNE", "0") == "1"


def _bench(fn) -> float:
    """Median milliseconds of fn() (Triton's do_bench: L2 flushed between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=3, rep=15, return_mode="median")


def launch_tuned(kernel, grid_of, candidates: list[dict], *, key: tuple, writes: tuple[str, ...], **args) -> None:
    """`launch` with the fastest of `candidates` (dicts of constexprs plus num_warps / num_stages; `grid_of(config)`
    gives each one's grid). Every candidate must compute the same outputs from the same inputs (tested under the
    interpreter, each forced in turn: `force_candidate`). The first is the default."""

    def run(cfg):
        launch(kernel, grid_of(cfg), writes=writes, **args, **cfg)

    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    choice = _forced if _forced is not None else 0
    if _forced is None and len(candidates) > 1 and _tunes(args):
        tag = (name, key)
        if tag not in _tuned:
            times = [_bench(lambda c=c: run(c)) for c in candidates]
            _tuned[tag] = min(range(len(candidates)), key=times.__getitem__)
        choice = _tuned[tag]
    choice = min(choice, len(candidates) - 1)
    if _captured is not None and _alternates:
        for i, cfg in enumerate(candidates):
            if i != choice:
                options = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
                constexprs = {k: v for k, v in cfg.items() if k not in options}
                _captured.append(Launch(kernel, grid_of(cfg), {**args, **constexprs}, tuple(writes), options))
    run(candidates[choice])


_forced: int | None = None


@contextlib.contextmanager
def force_candidate(index: int):
    """Every `launch_tuned` inside the block uses candidate `index` (clamped to the last): tests run each in turn."""
    global _forced
    previous, _forced = _forced, index
    try:
        yield
    finally:
        _forced = previous


def check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape_tail: tuple | None = None) -> None:
    """Raise a ValueError that says what is wrong; kernels never run on inputs they were not written for."""
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported by the Triton kernel (supported: {dtypes})")
    if not t.is_contiguous():
        raise ValueError(f"{name}: the Triton kernel needs a contiguous tensor (got strides {t.stride()})")
    if not interpreting() and t.device.type not in ("cuda", "meta"):
        raise ValueError(f"{name}: on {t.device} the Triton kernels need TRITON_INTERPRET=1 (set before import triton)")
    if shape_tail is not None and tuple(t.shape[-len(shape_tail) :]) != tuple(shape_tail):
        raise ValueError(f"{name}: expected trailing shape {tuple(shape_tail)}, got {tuple(t.shape)}")


def stream_tile(n: int, C: int) -> tuple[int, int, int]:
    """(N_PAD, BLOCK_T, BLOCK_C) of the stream kernels (stream_mix.py, single_pass.py): a [T, n, C] tile of ~1k values
    per program (8 per thread at 4 warps: every tile holds 64-bit pointers, so more values per thread push the
    backward past 255 registers and spill; n = 16 with an unaligned C at 2k values per program did, in the compile
    gate)."""
    n_pad = next_pow2(n)
    block_c = min(128, next_pow2(C), max(16, 1024 // n_pad))
    block_t = max(1, min(16, 1024 // (n_pad * block_c)))
    return n_pad, block_t, block_c
