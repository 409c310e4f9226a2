"""Text generation with a KV cache, for every arm, driving the model's own modules from outside.

Axis legend: B batch, T new tokens, L cached length, n streams, C channels, H heads, D head size, V vocabulary.

- Only attention mixes tokens. The connection coefficients (H_pre, H_post, H_res, Sinkhorn included) and the n-stream
  state of a token are functions of that token's own state, so a decode step runs the embedding, every connection
  site, the FFNs and the head on the new token only, and attention reads the cached keys and values of the prefix.
  Nothing is recomputed over the prefix, and no stream state of past tokens is kept: the cache is the K/V of each
  layer, exactly as for the residual baseline.
- The sites run as `site(x, sublayer)` through `sites.decode_site`: the training math (the same ops) regrouped into a
  few ops per site with the token-free parts precomputed, since a decode step is dispatch-bound (torch backend, fp32;
  otherwise the site's own `forward`, e.g. the fused triton kernels on CUDA). Only the attention sub-layer is
  replaced, by `_cached_attention`, which uses the block's `wq/wk/wv/wo` and the model's RoPE table at each row's own
  positions. With MLA (model.attention=mla) the cache holds each layer's compressed latent instead and attention
  runs with wkv_b absorbed (`mla_cache.py`).
- Batched prompts of different lengths are left-padded: each row's positions start at 0 at its first real token,
  pad keys are masked out (a pad query sees only itself, so no row of the softmax is empty), and every row then
  decodes in lockstep.
- Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, from a seeded generator (the same
  seed gives the same tokens). A row stops at EOS; the batch stops when every row has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mhc_train.infer.errors import InferenceError
from mhc_train.infer.mla_cache import latent_cache, mla_cached_attention
from mhc_train.infer.sites import decode_site
from mhc_train.model.transformer import Transformer, head_dim


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # tokens generated per prompt (fewer where a row reaches EOS)
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before sampling
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p (1 = all)
    seed: int = 0  # seeds the sampling generator
    stop_at_eos: bool = True  # a row stops after emitting EOS (the EOS is kept in its output)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InferenceError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InferenceError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p}")


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: k, v [n_layer, B, H_kv, max_len, D].

    `key_valid` [B, max_len] marks real (non-pad) positions; `positions` [B, max_len] is each slot's RoPE position.
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, pad: list[int]):
        cfg = model.cfg
        n_kv, d = cfg.n_kv_head or cfg.n_head, head_dim(cfg)
        w = model.tok_embeddings.weight
        if cfg.attention == "mla":  # the compressed latent [n_layer, B, 1, max_len, R + P], no values (mla_cache.py)
            self.k, self.v = latent_cache(model, batch, max_len), None
        else:
            self.k = torch.zeros(cfg.n_layer, batch, n_kv, max_len, d, dtype=w.dtype, device=w.device)
            self.v = torch.zeros_like(self.k)
        slots = torch.arange(max_len, device=w.device)
        pad_t = torch.tensor(pad, device=w.device)[:, None]  # [B, 1]
        self.key_valid = slots[None, :] >= pad_t  # [B, max_len]
        self.positions = (slots[None, :] - pad_t).clamp(min=0)  # [B, max_len]
        self.padded = any(pad)
        self.length = 0


def rope_at(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rope` with a table per row: x [B, T, H, D], rope [B, T, D/2, 2] (the same arithmetic)."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)  # [B, T, 1, D/2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Decoder:
    """Runs a plain `Transformer` (not wrapped by any engine) over new tokens against a `KVCache`. `native`: mHC's
    Sinkhorn as one C call per site on CPU (`sinkhorn_cpu.py`; False: torch ops only, the same result, slower)."""

    def __init__(self, model: Transformer, native: bool = True):
        if model.tok_embeddings is None or model.output is None:
            raise InferenceError("decode needs the whole model (embedding to head), not a pipeline stage")
        self.model = model
        self.cfg = model.cfg
        # (attention site, FFN site) of every block, as decode runs them (see sites.py)
        self.sites = [
            (decode_site(b.attn_conn, native), decode_site(b.ffn_conn, native)) for b in model.layers.values()
        ]
        self._attend = self._cached_attention if self.cfg.attention != "mla" else self._cached_latent_attention

    def new_cache(self, batch: int, max_len: int, pad: list[int] | None = None) -> KVCache:
        return KVCache(self.model, batch, max_len, pad or [0] * batch)

    def _mask(self, cache: KVCache, start: int, T: int) -> torch.Tensor | None:
        """[B, 1, T, start+T] bool (True = attend), or None where plain causal attention is exact."""
        if not cache.padded and (T == 1 or start == 0):
            return None  # one new token sees every cached key; a fresh prompt is plain causal attention
        end = start + T
        q = torch.arange(start, end, device=cache.k.device)[:, None]  # [T, 1]
        kpos = torch.arange(end, device=cache.k.device)[None, :]  # [1, end]
        allowed = (kpos <= q) & (cache.key_valid[:, None, :end] | (kpos == q))  # [B, T, end]
        return allowed[:, None]

    def _cached_attention(self, layer_idx, attn, h, cache: KVCache, rope, mask, start):
        B, T, _ = h.shape  # batch, new tokens, channels
        end = start + T
        q = attn.wq(h).view(B, T, attn.n_head, attn.head_dim)
        k = attn.wk(h).view(B, T, attn.n_kv_head, attn.head_dim)
        v = attn.wv(h).view(B, T, attn.n_kv_head, attn.head_dim)
        if hasattr(attn, "q_norm"):  # model.qk_norm
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rope_at(q, rope), rope_at(k, rope)
        cache.k[layer_idx, :, :, start:end] = k.transpose(1, 2)
        cache.v[layer_idx, :, :, start:end] = v.transpose(1, 2)
        keys, values = cache.k[layer_idx, :, :, :end], cache.v[layer_idx, :, :, :end]  # [B, H_kv, end, D]
        causal = mask is None and T > 1  # a fresh, unpadded prompt: plain causal attention
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=attn.n_kv_head != attn.n_head
        )
        return attn.wo(y.transpose(1, 2).reshape(B, T, -1))

    def _cached_latent_attention(self, layer_idx, attn, h, cache: KVCache, rope, mask, start):
        return mla_cached_attention(layer_idx, attn, h, cache, rope, mask, start, rope_at)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] appended at the cache's end -> logits [B, T, V] (all_logits) or [B, V] (the last)."""
        model = self.model
        B, T = tokens.shape  # batch, new tokens
        start = cache.length
        if start + T > cache.k.shape[3]:
            raise InferenceError(f"the KV cache holds {cache.k.shape[3]} positions; {start} + {T} do not fit")
        rope = model.rope[cache.positions[:, start : start + T]]  # [B, T, D/2, 2]
        mask = self._mask(cache, start, T)
        x = model.embed(tokens)  # [B, T, n, C]
        for i, (layer, (attn_site, ffn_site)) in enumerate(zip(model.layers.values(), self.sites)):
            attn = lambda h, i=i, layer=layer: self._attend(  # noqa: E731
                i, layer.attn, layer.attn_norm(h), cache, rope, mask, start
            )
            x = attn_site(x, attn)  # [B, T, n, C]: the site's coefficients, on the new tokens only
            x = ffn_site(x, lambda h, layer=layer: layer.ffn(layer.ffn_norm(h)))  # [B, T, n, C]
        cache.length = start + T
        return model.head(x) if all_logits else model.head(x[:, -1:])[:, 0]


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (greedy, or temperature / top-k / top-p sampling)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p  # mass before a token already reaches top_p; the first stays
        floor = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)  # smallest kept logit
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def check_context(lengths: list[int], max_new_tokens: int, max_seq_len: int) -> None:
    longest = max(lengths)
    if longest == 0:
        raise InferenceError("a prompt is empty; give at least one token of text (the model has no BOS token)")
    if longest + max_new_tokens <= max_seq_len:
        return
    fixes = []  # only the fixes that can work on their own: never "at most -36 tokens"
    if max_new_tokens < max_seq_len:
        fixes.append(f"shorten the prompt to at most {max_seq_len - max_new_tokens} tokens")
    if longest < max_seq_len:
        fixes.append(f"lower max_new_tokens to at most {max_seq_len - longest}")
    fix = " or ".join(fixes) or f"shorten the prompt and lower max_new_tokens to {max_seq_len} tokens together"
    raise InferenceError(
        f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's context of "
        f"{max_seq_len} tokens (model.max_seq_len); {fix}"
    )


def generate(
    model: Transformer, prompts: list[list[int]], cfg: SamplingConfig, eos_id: int | None = None, native: bool = True
) -> list[list[int]]:
    """Continue every prompt (token ids); returns the new tokens of each (ending at EOS where it stopped). `native`: see
    `Decoder`."""
    cfg.validate()
    if not prompts:
        raise InferenceError("no prompts given")
    lengths = [len(p) for p in prompts]
    check_context(lengths, cfg.max_new_tokens, model.cfg.max_seq_len)
    decoder = Decoder(model, native)
    device = model.tok_embeddings.weight.device
    longest = max(lengths)
    pad = [longest - n for n in lengths]
    tokens = torch.tensor([[0] * p + list(ids) for p, ids in zip(pad, prompts)], dtype=torch.long, device=device)
    cache = decoder.new_cache(len(prompts), longest + cfg.max_new_tokens, pad)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    stop = cfg.stop_at_eos and eos_id is not None and eos_id >= 0
    out = torch.empty(len(prompts), cfg.max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = decoder.forward(tokens, cache)  # prefill: [B, V]
    steps = 0
    for t in range(cfg.max_new_tokens):
        nxt = sample(logits, cfg, generator)  # [B]
        out[:, t] = nxt
        steps = t + 1
        if stop:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if t + 1 < cfg.max_new_tokens:
            logits = decoder.forward(nxt[:, None], cache)
    rows = out[:, :steps].tolist()
    if stop:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    return rows
