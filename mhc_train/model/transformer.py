"""A LLaMA-style decoder whose residual stream is a pluggable `Connection` (residual, HC or mHC).

Axis legend: B batch, T time, n streams, C channels, V vocabulary.

- One block code path for every connection type: each sub-layer is wrapped by its connection site, one line each.
- The stream state `[B, T, n, C]` persists across all blocks; expand after the embedding, collapse before the
  final norm (spec section 1).
- Blocks live in a ModuleDict keyed by their index as a string, and `forward` passes through a missing embedding,
  norm or head, so pipeline stages cut from this model keep stable parameter names.
- Construction allocates only (works on the meta device); `init_weights(seed)` sets every value, each module's from
  its own seed, so a sharded or cut model initialises only what it holds.
- `forward` is `head(run_blocks(embed(tokens)))`. The blocks run as a plain loop unless a block runner was chosen
  with `use_block_runner` (mhc_train.parallel installs recomputation this way when it builds the engine); the runner
  gets every site as an explicit `SitePart`, so it needs nothing else from the model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mhc_train.config import ConnectionConfig, ModelConfig, validate_connection, validate_model
from mhc_train.config.shapes import ffn_hidden_dim
from mhc_train.model.connections import Connection, build_connection
from mhc_train.model.documents import document_ids, document_layout
from mhc_train.model.layers import Attention, FeedForward, RMSNorm, scaled_rope_cache
from mhc_train.model.mla import MLAttention, rope_dim
from mhc_train.model.moe import GroupedExperts, MoE


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_head


def model_rope_cache(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The model's RoPE table [max_seq_len, rope_dim / 2, 2] (the head size, MLA's qk_rope_head_dim), with
    model.rope_scaling applied."""
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                   cfg.rope_original_max_seq_len)  # fmt: skip
    return scaled_rope_cache(rope_dim(cfg), cfg.max_seq_len, cfg.rope_theta, scaling, device)


class SitePart(NamedTuple):
    """One connection site as the blocks compose it: `x_{l+1} = site(x_l, lambda h: fn(norm(h)))`. `owner` is the
    module holding `fn`'s weights (a runner that recomputes F needs them)."""

    site: nn.Module
    norm: nn.Module
    fn: Callable[[torch.Tensor], torch.Tensor]
    owner: nn.Module


BlockRunner = Callable[[list[SitePart], torch.Tensor], torch.Tensor]  # (sites in order, x [B,T,n,C]) -> x


def build_ffn(cfg: ModelConfig, layer_id: int) -> nn.Module:
    """The block's FFN: SwiGLU, or (model.ffn=moe, past the first_k_dense blocks) the MoE FFN (moe.py)."""
    if cfg.ffn == "moe" and layer_id >= cfg.moe.first_k_dense:
        return MoE(cfg.dim, cfg.moe, cfg.moe.expert_hidden_dim or ffn_hidden_dim(cfg))
    return FeedForward(cfg.dim, ffn_hidden_dim(cfg))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, conn: Connection, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.attention == "mla":  # DeepSeek's multi-head latent attention (model.mla.*)
            self.attn = MLAttention(cfg)
        else:
            self.attn = Attention(cfg.dim, cfg.n_head, cfg.n_kv_head or cfg.n_head, head_dim(cfg), cfg.qkv_bias,
                                  cfg.qk_norm, cfg.norm_eps)  # fmt: skip
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer_id)
        self.attn_conn = conn.site(cfg.dim, 2 * layer_id)
        self.ffn_conn = conn.site(cfg.dim, 2 * layer_id + 1)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, doc=None) -> torch.Tensor:
        kw = {} if doc is None else {"doc": doc}  # per-document attention (model/documents.py) only when asked
        x = self.attn_conn(x, lambda h: self.attn(self.attn_norm(h), rope, **kw))  # [B, T, n, C]
        x = self.ffn_conn(x, lambda h: self.ffn(self.ffn_norm(h)))  # [B, T, n, C]
        return x

    def site_parts(self, rope: torch.Tensor, doc=None) -> list[SitePart]:
        """The block's two sites as `forward` composes them, with the RMSNorm apart from F (recompute needs it)."""
        kw = {} if doc is None else {"doc": doc}
        return [
            SitePart(self.attn_conn, self.attn_norm, lambda h: self.attn(h, rope, **kw), self.attn),
            SitePart(self.ffn_conn, self.ffn_norm, self.ffn, self.ffn),
        ]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, conn_cfg: ConnectionConfig):
        super().__init__()
        self.cfg, self.conn_cfg = cfg, conn_cfg
        self.conn = build_connection(conn_cfg)
        # bf16 streams: stored in bf16 from the expand on (every site returns its stream dtype); None: the embedding's
        self.stream_dtype = torch.bfloat16 if cfg.stream_dtype == "bf16" else None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, self.conn, i) for i in range(cfg.n_layer)})
        self.conn.chain_sites([site for _, site in self.sites()])  # forward order (single-pass mHC fuses across it)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.collapse_conn = self.conn.collapse_module(cfg.dim)  # the final stream read (connection.collapse)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._block_runner: BlockRunner | None = None  # see `use_block_runner`
        self._loss_fn: Callable | None = None  # see `use_loss`
        self.document_eos: int | None = None  # see `use_documents`
        self.document_rope_restart = False
        self.document_kernel = "sdpa"  # see `use_documents`
        self.register_buffer("rope", model_rope_cache(cfg), persistent=False)

    @property
    def n_streams(self) -> int:
        return self.conn.n_streams

    @property
    def block_runner(self) -> BlockRunner | None:
        return self._block_runner

    def use_block_runner(self, runner: BlockRunner | None) -> None:
        """Choose how the blocks run: `runner(site_parts, x)` instead of the plain loop (None restores it). Chosen once,
        when parallelism is applied (mhc_train.parallel.apply_recompute); the result equals the plain loop's."""
        self._block_runner = runner

    def use_loss(self, loss_fn: Callable | None) -> None:
        """Compute the training loss as `loss_fn(h [B, T, C] after the final norm, head, targets)` instead of
        `chunked_lm_loss` (None restores it): tensor parallelism installs its vocab-parallel loss this way."""
        self._loss_fn = loss_fn

    def site_parts(self, doc=None) -> list[SitePart]:
        """Every connection site of the blocks this module holds, in forward order."""
        return [part for layer in self.layers.values() for part in layer.site_parts(self.rope, doc)]

    def use_documents(self, eos_id: int | None, restart_rope: bool = False, kernel: str = "sdpa") -> None:
        """Per-document attention in training (data.document_mask): `forward` finds the documents of its token
        batches at `eos_id` (None: off, the default) and attends within each, RoPE restarting per document with
        `restart_rope`. Set once, like `use_block_runner`; generation and export build models without it. `kernel`:
        "sdpa" (a boolean mask) or "flex" (flex_attention; `documents.document_kernel` resolves the config's auto)."""
        self.document_eos, self.document_rope_restart, self.document_kernel = eos_id, restart_rope, kernel

    def document_layout(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """The `DocumentLayout` of a forward: from `doc_ids` [B, T] when given, else from the EOS tokens of `tokens`
        when `use_documents` is on; None (plain causal attention) otherwise."""
        if doc_ids is None and (self.document_eos is None or tokens.dtype.is_floating_point):
            return None
        doc_ids = document_ids(tokens, self.document_eos) if doc_ids is None else doc_ids
        return document_layout(doc_ids, self.document_rope_restart, self.document_kernel)

    def sites(self) -> list[tuple[str, nn.Module]]:
        """Connection sites in forward order: (name, site)."""
        return [(f"{k}.{s}", getattr(b, f"{s}_conn")) for k, b in self.layers.items() for s in ("attn", "ffn")]

    def init_weights(self, seed: int = 0, write: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """Set every weight from `seed` (nothing is drawn from the global RNG).

        - token embedding, all linear weights: N(0, init_std)
        - output projections (attention `wo`, FFN `w2`): N(0, init_std / sqrt(2 n_layer) * f), f = 1 except HC's
          sqrt(n) flag (GPT-2's depth-scaled init)
        - LM head: N(0, init_std) (or tied to the embedding)
        - RMSNorm gains: 1; connection sites: their own `initial_values` (see connections.py)

        Each module draws from its own CPU generator, seeded from (seed, the module's name): a value depends on
        nothing else, not on the device, nor on which modules a pipeline stage holds, nor on how they are sharded, so
        every engine starts from the same weights and a stage or a shard initialises just what it holds (one
        module's full values at a time pass through host memory). `write(param, full_value)` puts a
        value into a parameter (default: copy); the parallel package passes one that keeps this rank's shard of a
        DTensor, so a model built on the meta device and sharded is initialised without ever being whole.
        """
        write = write or (lambda param, value: param.copy_(value))
        with torch.no_grad():
            for name, mod, params in self.weight_modules():
                if any(p.device.type == "meta" for p in params.values()):
                    raise RuntimeError(f"{name}: parameters on the meta device; materialise them first (to_empty)")
                values = self.initial_values(name, mod, seed)
                for key, p in params.items():
                    write(p, values[key].to(p.dtype))
        self.init_buffers()

    def weight_modules(self):
        """(name, module, {parameter name: parameter}) for every module that owns parameters, each parameter once
        (a tied weight belongs to the module that comes first, the embedding), in `named_modules` order."""
        seen: set[int] = set()
        for name, mod in self.named_modules():
            params = {k: p for k, p in mod.named_parameters(recurse=False) if id(p) not in seen}
            if params:
                seen.update(id(p) for p in params.values())
                yield name, mod, params

    def initial_values(self, name: str, mod: nn.Module, seed: int) -> dict[str, torch.Tensor]:
        """{parameter name: full initial value, on the host} of module `name` (see `init_weights`)."""
        std = self.cfg.init_std
        g = torch.Generator(device="cpu").manual_seed(module_seed(seed, name))
        if isinstance(mod, RMSNorm):
            values = {"weight": torch.ones(mod.weight.shape)}
        elif isinstance(mod, (nn.Linear, nn.Embedding)):
            out_std = std / (2 * self.cfg.n_layer) ** 0.5 * self.conn.out_proj_std_factor
            s = out_std if name.endswith(("attn.wo", "ffn.w2", "ffn.shared.w2")) else std
            values = {"weight": torch.empty(mod.weight.shape).normal_(0.0, s, generator=g)}
            if getattr(mod, "bias", None) is not None:  # model.qkv_bias
                values["bias"] = torch.zeros(mod.bias.shape)
        elif isinstance(mod, GroupedExperts):  # routed experts: w2 is an output projection
            out_std = std / (2 * self.cfg.n_layer) ** 0.5 * self.conn.out_proj_std_factor
            values = mod.expert_initial_values(g, std, out_std)
        elif hasattr(mod, "initial_values"):  # a connection site
            values = mod.initial_values(g)
        else:
            raise TypeError(f"{name} ({type(mod).__name__}) has parameters init_weights does not know")
        params = {k for k, _ in mod.named_parameters(recurse=False)}
        if set(values) != params:
            raise TypeError(f"{name}: initial values for {sorted(values)}, parameters {sorted(params)}")
        return values

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the buffers (the RoPE table), e.g. after `to_empty` moved the model off the meta device."""
        self.rope.copy_(model_rope_cache(self.cfg, self.rope.device))
        for mod in self.modules():  # MoE: no balancing bias yet, no counts (a checkpoint's bias is loaded after)
            if isinstance(mod, MoE):
                mod.expert_bias.zero_()
                mod.load_stats.zero_()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> stream state [B, T, n, C]; a stage without the embedding passes its input through."""
        if self.tok_embeddings is None:
            return tokens
        h = self.conn.expand(self.tok_embeddings(tokens))  # [B, T, n, C]
        # model.stream_dtype, or at least fp32 (a bf16 embedding weight, e.g. FSDP's bf16 gather, keeps fp32 streams)
        return h.to(self.stream_dtype or torch.promote_types(h.dtype, torch.float32))

    def run_blocks(self, h: torch.Tensor, plain: bool = False, doc=None) -> torch.Tensor:
        """[B, T, n, C] through the blocks: the chosen block runner, or the plain loop (always with `plain`); `doc`: a
        `DocumentLayout` (per-document attention) or None."""
        if self._block_runner is not None and not plain:
            return self._block_runner(self.site_parts(doc), h)
        for layer in self.layers.values():
            h = layer(h, self.rope) if doc is None else layer(h, self.rope, doc)  # [B, T, n, C]
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, n, C] -> logits [B, T, V]; a stage without the final norm passes the stream state through."""
        if self.norm is None:  # a stage's boundary output: never a view (pipelining detaches it in place)
            return h if h._base is None else h.clone()
        h = self.norm(self.collapse_conn(h))  # [B, T, C]
        return self.output(h) if self.output is not None else h

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, T] (or the stream state [B, T, n, C] on a later pipeline stage) -> logits [B, T, V]; with
        `targets` [B, T] (a whole model), the mean next-token loss instead, chunked over tokens (`chunked_lm_loss`):
        no full fp32 [B*T, V] logits tensor is held. `doc_ids` [B, T] (or `use_documents`): attention stays within
        each document (model/documents.py); None and documents off: plain causal attention, as always."""
        h = self.run_blocks(self.embed(tokens), doc=self.document_layout(tokens, doc_ids))
        if targets is None or self.norm is None:  # a pipeline stage before the last passes the stream on
            return self.head(h)
        return (self._loss_fn or chunked_lm_loss)(self.norm(self.collapse_conn(h)), self.output, targets)


def module_seed(seed: int, name: str) -> int:
    """The seed of module `name`'s initial values under run seed `seed` (stable across processes and versions)."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63


def build_model(cfg: ModelConfig, conn_cfg: ConnectionConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """Validate the configs, build on `device` and initialise from `seed`: the Python users' entry point, and with
    `mhc_train.config.load_config` one of the two places a config is validated (the constructors trust it)."""
    validate_model(cfg)
    validate_connection(conn_cfg)
    with torch.device(device):
        model = Transformer(cfg, conn_cfg)
    if str(device) != "meta":
        model.init_weights(seed)
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against targets [B, T], in fp32: the one loss of every
    engine, the pipeline's last stage, the oracles and the benchmarks."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


LOSS_CHUNK_ELEMENTS = 1 << 26  # fp32 logits per chunk (256 MiB): 2048 tokens at V=32000; test models never split


def chunked_lm_loss(h: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    max_elements: int | None = None) -> torch.Tensor:  # fmt: skip
    """`lm_loss(head(h), targets)` for the final hidden state h [B, T, C], chunked over tokens: each chunk of at most
    `max_elements // V` tokens computes its logits, their fp32 cross-entropy sum, and drops them; backward
    recomputes each chunk's logits (torch's non-reentrant checkpoint, autocast state kept). Peak: one chunk's fp32
    logits instead of all of them. A batch that fits one chunk takes `lm_loss` itself (the same bits as before); a
    split one sums per chunk, then divides: equal to fp32 rounding."""
    from torch.utils.checkpoint import checkpoint

    max_elements = LOSS_CHUNK_ELEMENTS if max_elements is None else max_elements  # read per call (tests lower it)
    flat_h, flat_t = h.flatten(0, 1), targets.flatten()  # [N, C], [N]
    n, per = flat_t.numel(), max(1, max_elements // head.weight.shape[0])
    if n <= per:
        return lm_loss(head(h), targets)
    sums = [
        checkpoint(_ce_sum, head, flat_h[i : i + per], flat_t[i : i + per], use_reentrant=False)
        for i in range(0, n, per)
    ]
    return torch.stack(sums).sum() / n


def _ce_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains, biases, gates, scalars and HC static parts get no weight decay."""
    return param.ndim < 2 or "static_" in name
