"""Sinkhorn-Knopp forward for decode on CPU as one C call: the loop `sinkhorn_knopp_ref` runs as 2 * t_max torch ops.

Axis legend: N tokens, n streams.

Decode feeds one token per row, so an mHC site's Sinkhorn is 40 dependent normalisations of a 4 x 4 matrix per token
(t_max = 20): 80 torch dispatches of a few microseconds each, most of an mHC decode step's extra cost over the
residual's. No regrouping shortens a chain of dependent steps, so this runs it as one loop in C, 20 lines below,
exactly `sinkhorn_knopp_ref`'s arithmetic: subtract the max, exp, then per iteration divide every column by its sum
(summed top to bottom), then every row by its sum (left to right), in float32.

The source is compiled once per machine with the C compiler triton also uses (`$CC`, else `cc`, `gcc`, `clang`)
into `$XDG_CACHE_HOME/mhc_train` (default `~/.cache/mhc_train`), named by a hash of the source, and loaded with
ctypes. Without a compiler `native_sinkhorn()` returns None and says why once (a warning); decode then runs the torch
backend's Sinkhorn forward in place (`ops.reference.sinkhorn_forward`): the same result, slower. Training never uses
this (no autograd; `mhc_train.ops` has the differentiable Sinkhorn and the fused triton kernel).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>

/* out[b] = Sinkhorn-Knopp(z[b]) for b < batch: z[b] is n x n row-major at z + b * z_stride, out is contiguous. */
void mhc_sinkhorn_f32(const float *z, long z_stride, float *out, long batch, long n, long iters) {
    for (long b = 0; b < batch; ++b) {
        const float *zb = z + b * z_stride;
        float *m = out + b * n * n;
        float top = zb[0];
        for (long k = 1; k < n * n; ++k) top = zb[k] > top ? zb[k] : top;
        for (long k = 0; k < n * n; ++k) m[k] = expf(zb[k] - top); /* the shift is exact */
        for (long t = 0; t < iters; ++t) {
            for (long j = 0; j < n; ++j) { /* columns first */
                float s = 0.0f;
                for (long i = 0; i < n; ++i) s += m[i * n + j];
                for (long i = 0; i < n; ++i) m[i * n + j] /= s;
            }
            for (long i = 0; i < n; ++i) { /* rows last */
                float s = 0.0f;
                for (long j = 0; j < n; ++j) s += m[i * n + j];
                for (long j = 0; j < n; ++j) m[i * n + j] /= s;
            }
        }
    }
}
"""

NativeSinkhorn = Callable[[torch.Tensor, int], torch.Tensor]


def c_compiler() -> str | None:
    """The C compiler to build with: `$CC`, else the first of cc, gcc, clang on PATH (None: none found)."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mhc_train"


def _build(cc: str) -> Path:
    """Compile SOURCE into the cache (once per source, compiler and machine type: a home directory may be shared by
    machines of different architectures); returns the shared library's path."""
    tag = hashlib.sha256(f"{SOURCE}{cc}{platform.machine()}{platform.system()}".encode()).hexdigest()[:16]
    lib = _cache_dir() / f"sinkhorn_cpu_{tag}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "sinkhorn_cpu.c", Path(tmp) / lib.name
        src.write_text(SOURCE)
        cmd = [cc, "-O2", "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]  # no -ffast-math: IEEE like torch
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
        os.replace(out, lib)  # atomic: a concurrent process sees no half-written file
    return lib


@functools.cache
def native_sinkhorn() -> NativeSinkhorn | None:
    """`fn(z, iters)`: z [N, n, n] float32 CPU logits -> [N, n, n] doubly stochastic; None where it cannot be built."""
    cc = c_compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install cc / gcc / clang)")
        kernel = ctypes.CDLL(str(_build(cc))).mhc_sinkhorn_f32
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"decode runs Sinkhorn as torch ops (slower, same result): the C loop is unavailable: {e}", stacklevel=2
        )
        return None
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long]
    kernel.restype = None

    def sinkhorn(z: torch.Tensor, iters: int) -> torch.Tensor:
        N, n, _ = z.shape
        if z.dtype != torch.float32 or z.device.type != "cpu":
            raise ValueError(f"native Sinkhorn takes float32 CPU logits, got {z.dtype} on {z.device}")
        if z.stride(-1) != 1 or z.stride(-2) != n:
            z = z.contiguous()  # each matrix row-major; the batch stride may be anything (a slice of the logits)
        out = torch.empty(N, n, n)
        kernel(z.data_ptr(), z.stride(0), out.data_ptr(), N, n, iters)
        return out

    return sinkhorn
