"""Shared launch helpers for the mHC Triton kernels."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1 must be set before `import triton`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape_tail: tuple | None = None) -> None:
    """Raise a ValueError that says what is wrong; kernels never run on inputs they were not written for."""
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported by the Triton kernel (supported: {dtypes})")
    if not t.is_contiguous():
        raise ValueError(f"{name}: the Triton kernel needs a contiguous tensor (got strides {t.stride()})")
    if not interpreting() and t.device.type != "cuda":
        raise ValueError(f"{name}: on {t.device} the Triton kernels need TRITON_INTERPRET=1 (set before import triton)")
    if shape_tail is not None and tuple(t.shape[-len(shape_tail) :]) != tuple(shape_tail):
        raise ValueError(f"{name}: expected trailing shape {tuple(shape_tail)}, got {tuple(t.shape)}")


MAX_STREAMS = 16  # n above this is refused (register tiles are n x n per token); tested for n in 1, 2, 4, 8
STREAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
