"""Per-document attention in a packed window: document ids from the EOS tokens, the block-diagonal causal mask, and
RoPE positions that restart at each document (data.document_mask, data.document_rope_restart).

Axis legend: B batch, T time, H heads, D head size.

- A document ends with its EOS token (prepare joins documents as `doc EOS doc EOS ...`, shards.py), so the EOS belongs
  to the document it ends and the next token starts a new one: document id = the number of EOS tokens strictly
  before the position. The loss is unchanged: the EOS position still predicts the next document's first token, now
  from its own document alone (as Llama 3 and torchtitan do).
- The mask is a boolean [B, 1, T, T] (True = attend) for `F.scaled_dot_product_attention`, built once per forward
  and shared by every layer. SDPA with an explicit mask takes the math or memory-efficient kernel, not flash: the
  CUDA varlen / flex-attention path that skips the masked blocks is not built (a TODO where it would pay: long
  windows of short documents).
- RoPE scores depend on relative positions only, so under the mask a restart changes the attention by rounding alone;
  it is offered because it keeps every document's absolute positions in the range decode sees (from 0).
- Restarted positions gather the RoPE table per token and rotate through `apply_rope` itself (batch folded into time),
  so the rotation is the same code as the default path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mhc_train.model.layers import apply_rope


class DocumentLayout(NamedTuple):
    """What attention needs to stay within documents: `mask` [B, 1, T, T] (True = attend), and `positions` [B, T]
    (the RoPE position of each token; None: 0..T-1 as without documents)."""

    mask: torch.Tensor
    positions: torch.Tensor | None

    def rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE of x [B, T, H, D] at this layout's positions (rope: the [max_seq_len, D/2, 2] table)."""
        B, T, H, D = x.shape  # batch, time, heads, head size
        if self.positions is None:
            return apply_rope(x, rope[:T])
        table = rope[self.positions.flatten()]  # [B*T, D/2, 2]
        return apply_rope(x.reshape(1, B * T, H, D), table).view(B, T, H, D)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """tokens [B, T] -> document ids [B, T]: the number of EOS tokens before each position (an EOS ends its document)."""
    eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(eos, dim=-1) - eos  # exclusive cumulative sum


def document_layout(doc_ids: torch.Tensor, restart_positions: bool = False) -> DocumentLayout:
    """The block-diagonal causal mask of doc_ids [B, T] (equal ids = one document; ids never decrease), and with
    `restart_positions` each token's position within its document."""
    B, T = doc_ids.shape  # batch, time
    idx = torch.arange(T, device=doc_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [T, T]: key j <= query i
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # [B, T, T]
    positions = None
    if restart_positions:
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # [B, T]: its document's start
        positions = idx - first
    return DocumentLayout(mask[:, None], positions)
