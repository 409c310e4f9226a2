"""`MHCConfig`: the configuration of an mhc-train export (`config.json`), in transformers' names where they exist.

Copied by `mhc-train export` beside `modeling_mhc.py` (which imports it); needs only transformers. mhc-train's own
sections travel as dicts: `connection` (its ConnectionConfig), `mla` (model.mla.* for `attention: mla`) and `moe`
(model.moe.* for `ffn: moe`). Exports written before a key existed load with its default (the behaviour they had).
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MHCConfig(PretrainedConfig):
    model_type = "mhc_train"

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_size=704,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        connection=None,
        attention="gqa",
        mla=None,
        attention_bias=False,
        qk_norm=False,
        mhc_rope_scaling=None,
        ffn="dense",
        moe=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size  # the dense SwiGLU width (the first_k_dense blocks of an MoE)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        # mhc-train's ConnectionConfig as a dict: type (residual | hc | mhc | mhc_single_pass), n_streams, hc_dynamic,
        # h_res, t_max, eps, numerics (paper | deepseek_v4), hc_eps, collapse (sum | mean | learned)
        self.connection = dict(connection or {"type": "residual", "n_streams": 1})
        # mhc-train's model.attention and, for "mla", its MLAConfig as a dict: q_lora_rank (0 = none), kv_lora_rank,
        # qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.attention = attention
        self.mla = dict(mla or {})
        self.attention_bias = attention_bias  # biases on q, k, v (model.qkv_bias)
        self.qk_norm = qk_norm  # per-head RMSNorm of q and k before RoPE (model.qk_norm)
        self.mhc_rope_scaling = mhc_rope_scaling  # Llama 3's RoPE scaling parameters, or None (model.rope_scaling)
        # mhc-train's model.ffn and, for "moe", its MoEConfig as a dict: n_routed_experts, n_shared_experts, top_k,
        # expert_hidden_dim (0 = intermediate_size), first_k_dense, route_scale (the rest is training-only)
        self.ffn = ffn
        self.moe = dict(moe or {})
        kwargs["tie_word_embeddings"] = False  # the head is exported as its own tensor
        super().__init__(**kwargs)
