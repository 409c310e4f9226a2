"""Per-document attention in a packed window: document ids from the EOS tokens, the block-diagonal causal mask, and
RoPE positions that restart at each document (data.document_mask, data.document_rope_restart).

Axis legend: B batch, T time, H heads, D head size.

- A document ends with its EOS token (prepare joins documents as `doc EOS doc EOS ...`, shards.py), so the EOS belongs
  to the document it ends and the next token starts a new one: document id = the number of EOS tokens strictly
  before the position. The loss is unchanged: the EOS position still predicts the next document's first token, now
  from its own document alone (as Llama 3 and torchtitan do).
- Two kernels (data.document_mask_kernel, resolved by `document_kernel`): `sdpa`, a boolean [B, 1, T, T] mask (True =
  attend) for `F.scaled_dot_product_attention` (math or memory-efficient kernel, not flash; any device), and `flex`,
  `torch.nn.attention.flex_attention` with a `BlockMask` (mask_mod: causal and same document) that skips the blocks
  no query of a document needs. Either is built once per forward in the layout and shared by every layer; `auto`
  takes flex on CUDA where torch has it, sdpa otherwise. Attention asks `layout.block_mask` (None: the sdpa mask).
- Under autocast, flex's inputs are cast to the autocast dtype and it runs with autocast off (SDPA is an autocast op
  and gets the same cast from autocast itself; mixed fp32/bf16 inputs to a compiled flex are a known torch failure).
- flex_attention is compiled once, lazily, at module level on CUDA (eager flex materialises the scores, which is
  slow); elsewhere it runs eagerly. torch 2.13's CPU flex has a forward but no backward, so training refuses
  `flex` off CUDA (one line); the forward still runs on CPU, which is how the tests check it against sdpa.
- The BlockMask comes from `create_block_mask` uncompiled: it evaluates the mask_mod once per batch over [B, T, T]
  (transient memory a few times the sdpa mask's), then every layer reuses the block indices. Building the block
  indices straight from the document boundaries would avoid that; not done.
- RoPE scores depend on relative positions only, so under the mask a restart changes the attention by rounding alone;
  it is offered because it keeps every document's absolute positions in the range decode sees (from 0).
- Restarted positions gather the RoPE table per token and rotate through `apply_rope` itself (batch folded into time),
  so the rotation is the same code as the default path.
"""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

import torch

from mhc_train.config.schema import ConfigError
from mhc_train.model.layers import apply_rope

_COMPILED_FLEX: list = []  # torch.compile(flex_attention), made on first CUDA use


class DocumentLayout(NamedTuple):
    """What attention needs to stay within documents: `mask` [B, 1, T, T] (True = attend; None under flex),
    `positions` [B, T] (the RoPE position of each token; None: 0..T-1 as without documents), and `block_mask`
    (flex_attention's BlockMask; None: attend through SDPA with `mask`)."""

    mask: torch.Tensor | None
    positions: torch.Tensor | None
    block_mask: Any = None

    def rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE of x [B, T, H, D] at this layout's positions (rope: the [max_seq_len, D/2, 2] table)."""
        B, T, H, D = x.shape  # batch, time, heads, head size
        if self.positions is None:
            return apply_rope(x, rope[:T])
        table = rope[self.positions.flatten()]  # [B*T, D/2, 2]
        return apply_rope(x.reshape(1, B * T, H, D), table).view(B, T, H, D)

    def flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
             enable_gqa: bool = False) -> torch.Tensor:  # fmt: skip
        """flex_attention of q [B, H, T, D], k, v [B, H_kv, T, *] under this layout's block mask: [B, H, T, Dv].
        Under autocast the inputs are cast to its dtype first, as autocast casts SDPA's (flex is not an autocast op)."""
        kind = q.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            q, k, v = (t.to(dtype) for t in (q, k, v))
        with torch.autocast(kind, enabled=False):
            return _flex_attention(q.device)(q, k, v, block_mask=self.block_mask, scale=scale, enable_gqa=enable_gqa)


def flex_available() -> bool:
    """Whether this torch has `torch.nn.attention.flex_attention`."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ImportError:
        return False


def document_kernel(kernel: str, device: torch.device | str) -> str:
    """data.document_mask_kernel on `device` -> "sdpa" or "flex". auto is sdpa everywhere until flex has run on a
    GPU here (scripts/gpu_check.sh times and checks it; no GPU has been lent yet): flex is opt-in. Training with flex
    off CUDA, or on a torch without it, is one line (flex_attention has no CPU backward)."""
    cuda = torch.device(device).type == "cuda"
    if kernel in ("sdpa", "auto"):
        return "sdpa"
    if not cuda:
        raise ConfigError(
            f"data.document_mask_kernel='flex' needs a CUDA device (flex_attention has no backward on "
            f"{torch.device(device).type} in torch {torch.__version__}): set it to auto or sdpa"
        )
    if not flex_available():
        raise ConfigError(
            f"data.document_mask_kernel='flex': torch {torch.__version__} has no flex_attention: set it to auto or sdpa"
        )
    return "flex"


def _flex_attention(device: torch.device):
    """flex_attention: compiled once (first CUDA call), as torch recommends; eager elsewhere (CPU forward, tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    return _COMPILED_FLEX[0]


def _block_mask(doc_ids: torch.Tensor):
    """flex_attention's BlockMask of doc_ids [B, T]: key j is seen by query i when j <= i in the same document."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    B, T = doc_ids.shape  # batch, time
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """tokens [B, T] -> document ids [B, T]: the number of EOS tokens before each position (an EOS ends its document)."""
    eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(eos, dim=-1) - eos  # exclusive cumulative sum


def document_layout(doc_ids: torch.Tensor, restart_positions: bool = False, kernel: str = "sdpa") -> DocumentLayout:
    """The block-diagonal causal mask of doc_ids [B, T] (equal ids = one document; ids never decrease) for `kernel`
    ("sdpa": the boolean mask; "flex": a BlockMask), and with `restart_positions` each token's position within its
    document."""
    B, T = doc_ids.shape  # batch, time
    idx = torch.arange(T, device=doc_ids.device)
    mask, block_mask = None, None
    if kernel == "flex":
        block_mask = _block_mask(doc_ids)
    else:
        causal = idx[None, :] <= idx[:, None]  # [T, T]: key j <= query i
        mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
    positions = None
    if restart_positions:
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # [B, T]: its document's start
        positions = idx - first
    return DocumentLayout(mask, positions, block_mask)
