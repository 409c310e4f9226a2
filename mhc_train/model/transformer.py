"""A LLaMA-style decoder whose residual stream is a pluggable `Connection` (residual, HC or mHC).

Axis legend: B batch, T time, n streams, C channels, V vocabulary.

- One block code path for every connection type: each sub-layer is wrapped by its connection site, one line each.
- The stream state `[B, T, n, C]` persists across all blocks; expand after the embedding, collapse before the
  final norm (spec section 1).
- Blocks live in a ModuleDict keyed by their index as a string, and `forward` passes through a missing embedding,
  norm or head, so pipeline stages cut from this model keep stable parameter names.
- Construction allocates only (works on the meta device); `init_weights(seed)` sets every value.
"""

from __future__ import annotations

import torch
from torch import nn

from mhc_train.config import ConnectionConfig, ModelConfig, validate_connection, validate_model
from mhc_train.model.connections import Connection, build_connection
from mhc_train.model.layers import Attention, FeedForward, RMSNorm, rope_cache


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_head


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(2 * 4 * cfg.dim / 3)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, conn: Connection, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_head, cfg.n_kv_head or cfg.n_head, head_dim(cfg))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, ffn_hidden_dim(cfg))
        self.attn_conn = conn.site(cfg.dim, 2 * layer_id)
        self.ffn_conn = conn.site(cfg.dim, 2 * layer_id + 1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = self.attn_conn(x, lambda h: self.attn(self.attn_norm(h), rope))  # [B, T, n, C]
        x = self.ffn_conn(x, lambda h: self.ffn(self.ffn_norm(h)))  # [B, T, n, C]
        return x

    def site_parts(self, rope: torch.Tensor):
        """(connection site, sub-layer RMSNorm, sub-layer proper) per site, in order: what `forward` composes.
        Used by recomputation (mhc_train.parallel), which needs the norm apart from F."""
        return [
            (self.attn_conn, self.attn_norm, lambda h: self.attn(h, rope)),
            (self.ffn_conn, self.ffn_norm, self.ffn),
        ]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, conn_cfg: ConnectionConfig):
        super().__init__()
        validate_model(cfg)
        validate_connection(conn_cfg)
        self.cfg, self.conn_cfg = cfg, conn_cfg
        self.conn = build_connection(conn_cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, self.conn, i) for i in range(cfg.n_layer)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.layer_runner = None  # optional callable (model, h) -> h replacing the plain loop over blocks
        self.register_buffer("rope", rope_cache(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta), persistent=False)

    @property
    def n_streams(self) -> int:
        return self.conn.n_streams

    def sites(self) -> list[tuple[str, nn.Module]]:
        """Connection sites in forward order: (name, site)."""
        return [(f"{k}.{s}", getattr(b, f"{s}_conn")) for k, b in self.layers.items() for s in ("attn", "ffn")]

    def init_weights(self, seed: int = 0) -> None:
        """Set every weight from `seed` (nothing is drawn from the global RNG).

        - token embedding, all linear weights: N(0, init_std)
        - output projections (attention `wo`, FFN `w2`): N(0, init_std / sqrt(2 n_layer) * f), f = 1 except HC's
          sqrt(n) flag (GPT-2's depth-scaled init)
        - LM head: N(0, init_std) (or tied to the embedding)
        - RMSNorm gains: 1; connection sites: their own `init_weights` (see connections.py)
        """
        g = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layer) ** 0.5 * self.conn.out_proj_std_factor
        with torch.no_grad():
            for name, mod in self.named_modules():
                if isinstance(mod, RMSNorm):
                    mod.weight.fill_(1.0)
                elif isinstance(mod, nn.Linear):
                    is_out = name.endswith(("attn.wo", "ffn.w2"))
                    nn.init.normal_(mod.weight, 0.0, out_std if is_out else std, generator=g)
                elif isinstance(mod, nn.Embedding):
                    nn.init.normal_(mod.weight, 0.0, std, generator=g)
            for _, site in self.sites():
                site.init_weights(g)
            self.rope.copy_(rope_cache(head_dim(self.cfg), self.cfg.max_seq_len, self.cfg.rope_theta))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (or the stream state [B, T, n, C] on a later pipeline stage) -> logits [B, T, V]."""
        h = self.conn.expand(self.tok_embeddings(tokens)) if self.tok_embeddings is not None else tokens
        if self.layer_runner is not None:  # set from outside, e.g. by mhc_train.parallel.apply_recompute
            h = self.layer_runner(self, h)
        else:
            for layer in self.layers.values():
                h = layer(h, self.rope)  # [B, T, n, C]
        if self.norm is None:
            return h
        h = self.norm(self.conn.collapse(h))  # [B, T, C]
        return self.output(h) if self.output is not None else h


def build_model(cfg: ModelConfig, conn_cfg: ConnectionConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """Validate the configs, build on `device` and initialise from `seed`."""
    with torch.device(device):
        model = Transformer(cfg, conn_cfg)
    if str(device) != "meta":
        model.init_weights(seed)
    return model


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains, biases, gates, scalars and HC static parts get no weight decay."""
    return param.ndim < 2 or "static_" in name
