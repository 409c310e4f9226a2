"""mhc-train models for Hugging Face `transformers`: every arm the trainer trains (residual, HC, mHC with the paper's
or DeepSeek-V4's numerics, single-pass mHC), GQA or MLA attention, dense or MoE FFNs.

Copied by `mhc-train export` next to `config.json` and `model.safetensors`, with the files it imports
(`configuration_mhc.py`, `connections_mhc.py`, `layers_mhc.py`; transformers' dynamic module loader follows the
relative imports); loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. Needs only torch
and transformers (nothing of mhc_train). The math is mhc-train's torch path, line for line; tests/infer check the
logits match (fp32, 1e-5) and that transformers' `generate()` with its KV cache gives our greedy tokens.

Axis legend: B batch, T time, n streams, C channels, H heads, D head size.

- Streams: the token embedding expanded to the stream state (`connections_mhc.expand_streams`), every sub-layer
  wrapped by its connection site, the state read by the model's `collapse_conn` (sum, mean, learned, or the
  single-pass mix) before the final RMSNorm.
- Generation uses the transformers KV cache (`past_key_values`) for attention; the connection coefficients, the
  stream state (single-pass's carried mix included) and the MoE routing are per-token, so each step computes them
  for the new tokens only.
- Serving engines (vLLM's and SGLang's Transformers backends): `MHCModel` (AutoModel) is the decoder, `MHCForCausalLM`
  adds `lm_head`; every layer's attention is `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` (this file's
  `eager_attention` for "eager") with `layer_idx` on the module and the caller's kwargs passed down, and
  `_supports_attention_backend = True`. Masks: our own boolean one for eager, sdpa and registered functions,
  transformers' `create_causal_mask` for flash and flex. `output_hidden_states` gives the collapse of the streams
  after each block (the last one normed); `output_attentions` the eager weights.
- Parameter names are mhc-train's under `model.`, the head `lm_head` (a tied head is exported untied, as a copy); an
  MoE layer's balancing bias is the buffer `model.layers.{i}.ffn.expert_bias`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .configuration_mhc import MHCConfig
from .connections_mhc import expand_streams, make_collapse, make_site
from .layers_mhc import Attention, FeedForward, MLAttention, MoE, RMSNorm, rope_table

__all__ = ["MHCConfig", "MHCForCausalLM", "MHCModel"]


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = (
            MLAttention(cfg, layer_idx) if getattr(cfg, "attention", "gqa") == "mla" else Attention(cfg, layer_idx)
        )
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = getattr(cfg, "ffn", "dense") == "moe" and layer_idx >= cfg.moe.get("first_k_dense", 0)
        self.ffn = MoE(cfg) if moe else FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.attn_conn = make_site(cfg)
        self.ffn_conn = make_site(cfg)

    def forward(self, x, rope, mask, cache, **kwargs):
        """x [B, T, n, C] -> (x [B, T, n, C], attention weights or None)."""
        out = {}

        def attend(h):
            y, out["weights"] = self.attn(self.attn_norm(h), rope, mask, cache, **kwargs)
            return y

        x = self.attn_conn(x, attend)  # [B, T, n, C]
        x = self.ffn_conn(x, lambda h: self.ffn(self.ffn_norm(h)))  # [B, T, n, C]
        return x, out.get("weights")


def causal_mask(config, embeds, attention_mask, cache, position_ids, past):
    """The mask the configured attention expects: transformers' own builder for the implementations it knows beyond
    eager and sdpa (flash, flex); for eager, sdpa and any other registered function a boolean [B, 1, T, S] (True =
    attend; a pad query sees itself, so no softmax row is empty), or None where plain causal attention is exact."""
    B, T = embeds.shape[:2]
    impl, device = getattr(config, "_attn_implementation", None) or "sdpa", embeds.device
    if impl not in ("eager", "sdpa"):
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask
        except ImportError:
            ALL_MASK_ATTENTION_FUNCTIONS = {}
        if impl in ALL_MASK_ATTENTION_FUNCTIONS:
            params = inspect.signature(create_causal_mask).parameters
            kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
            kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
            kw["cache" if "cache" in params else "past_key_values"] = cache
            if "cache_position" in params:
                kw["cache_position"] = torch.arange(past, past + T, device=device)
            return create_causal_mask(**kw)
    if attention_mask is not None and not bool(attention_mask.all()):
        end = attention_mask.shape[1]
        q = torch.arange(end - T, end, device=device)[:, None]
        k = torch.arange(end, device=device)[None, :]
        return ((k <= q) & (attention_mask.bool()[:, None, :] | (k == q)))[:, None]  # pad queries see themselves
    if past and T > 1:
        q = torch.arange(past, past + T, device=device)[:, None]
        return (torch.arange(past + T, device=device)[None, :] <= q)[None, None].expand(B, 1, T, past + T)
    return None


def output_class(name):
    """transformers 5 names the cache field `cache`, 4 `past_key_values`."""
    from transformers import modeling_outputs

    cls = getattr(modeling_outputs, name)
    return cls, ("cache" if "cache" in cls.__dataclass_fields__ else "past_key_values")


class MHCPreTrainedModel(PreTrainedModel):
    config_class = MHCConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # every layer's attention goes through ALL_ATTENTION_FUNCTIONS

    def _init_weights(self, module):
        pass  # every weight comes from the exported checkpoint


class MHCModel(MHCPreTrainedModel):
    """The decoder without the LM head (AutoModel): last_hidden_state is the final RMSNorm of the streams' sum."""

    def __init__(self, config):
        super().__init__(config)
        conn = config.connection
        self.n_streams = 1 if conn.get("type") == "residual" else conn.get("n_streams", 4)  # the sites' n
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.collapse_conn = make_collapse(config)  # the final stream read (connection.collapse)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):  # fmt: skip
        cfg = self.config
        cache = kwargs.pop("cache", None) or past_key_values  # transformers 5 names it `cache`
        output_attentions = output_attentions if output_attentions is not None else cfg.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else getattr(cfg, "use_return_dict", True)
        for key in ("cache_position", "labels", "logits_to_keep"):
            kwargs.pop(key, None)
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        B, T = h.shape[:2]
        if cache is None and use_cache:  # generate() passes its own cache; a plain call caches only when asked
            from transformers import DynamicCache

            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row counts from its first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device).expand(B, T)
        mask = causal_mask(cfg, h, attention_mask, cache, position_ids, past)
        x = expand_streams(cfg, h)  # [B, T, n, C] (single-pass: n + 1 rows, the mix last)
        width = cfg.mla["qk_rope_head_dim"] if getattr(cfg, "attention", "gqa") == "mla" else cfg.head_dim
        rope = rope_table(position_ids, width, cfg.rope_theta, getattr(cfg, "mhc_rope_scaling", None))
        hidden, attentions = [], []
        for layer in self.layers.values():
            if output_hidden_states:
                hidden.append(self.collapse_conn(x))  # the streams' collapse, [B, T, C]
            x, weights = layer(x, rope, mask, cache, **kwargs)
            attentions.append(weights)
        out = self.norm(self.collapse_conn(x))  # [B, T, C]
        hidden = (*hidden, out) if output_hidden_states else None
        attentions = tuple(attentions) if output_attentions else None
        cls, field = output_class("BaseModelOutputWithPast")
        result = cls(last_hidden_state=out, hidden_states=hidden, attentions=attentions, **{field: cache})
        return result if return_dict else result.to_tuple()


class MHCForCausalLM(MHCPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MHCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, labels=None, return_dict=None, logits_to_keep=0,
                **kwargs):  # fmt: skip
        return_dict = return_dict if return_dict is not None else getattr(self.config, "use_return_dict", True)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         return_dict=True, **kwargs)  # fmt: skip
        cls, field = output_class("CausalLMOutputWithPast")
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        result = cls(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                     **{field: getattr(out, field)})  # fmt: skip
        return result if return_dict else result.to_tuple()
