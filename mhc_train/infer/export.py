"""Export a checkpoint to a directory Hugging Face `transformers` loads (`trust_remote_code=True`).

<out>/
  config.json               MHCConfig: the model shape in transformers' names, `connection` = our ConnectionConfig
  model.safetensors         the weights, fp32, named `model.<mhc-train parameter name>` (the head `lm_head.weight`)
  modeling_mhc.py           MHCModel + MHCForCausalLM, every arm (torch and transformers only), importing
  configuration_mhc.py      MHCConfig
  connections_mhc.py        the connection sites and collapses (paper and DeepSeek-V4 numerics, single-pass)
  layers_mhc.py             RMSNorm, RoPE, GQA / MLA attention, the dense and MoE FFNs
  tokenization_mhc.py       MHCTokenizer (sentencepiece itself, so ids equal ours)
  tokenizer.model           the run's sentencepiece model
  tokenizer_config.json, special_tokens_map.json, generation_config.json

Notes:
- The directory is written under a temporary name and renamed, so a half-written export never carries the name.
- Every model the trainer trains exports with equal logits (fp32, 1e-5; tests/infer): residual, HC, mHC with
  `connection.numerics` paper or deepseek_v4 and `connection.collapse` sum, mean or learned, and single-pass mHC
  (`connection.type=mhc_single_pass`; config.json's `connection.n_streams` is n, the state has n + 1 rows).
- MLA models (model.attention=mla) add `attention` and `mla` (model.mla.*) to config.json; MoE models (model.ffn=moe)
  add `ffn` and `moe` (model.moe.*), and each MoE layer's balancing bias is the buffer `model.layers.{i}.ffn.
  expert_bias` in model.safetensors. Dense GQA exports are unchanged. An MoE with a capacity factor is refused (its
  inference drops tokens depending on the batch; transformers' cached decode could not match it).
- A tied LM head is written as its own copy `lm_head.weight` (safetensors stores no aliases); config.json says
  tie_word_embeddings=false. The decoder is `model.<mhc-train name>` (AutoModel loads it alone).
- `hc_names="deepseek"` (`--hc-names deepseek`): the mHC sites and the learned collapse under DeepSeek-V4's names and
  layouts (`model.layers.{i}.attn_hc.fn` ..., `model.hc_head.hc_fn`; `mhc_train.model.deepseek_map`), config.json
  gains `hc_names` and the `DeepseekV4Config` connection fields, for DeepSeek-format tooling and `import-hf`. Such a
  directory has no `AutoModelForCausalLM` entry (modeling_mhc.py reads our names; it would start the sites from scratch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from mhc_train.infer.errors import InferenceError
from mhc_train.infer.load import Loaded
from mhc_train.model import deepseek_map
from mhc_train.model.transformer import ffn_hidden_dim, head_dim

HF_DIR = Path(__file__).parent / "hf"
MODELING_FILES = ("configuration_mhc.py", "connections_mhc.py", "layers_mhc.py", "modeling_mhc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mhc.MHCConfig",
    "AutoModel": "modeling_mhc.MHCModel",
    "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM",
}


def hf_config(loaded: Loaded) -> dict:
    cfg, conn = loaded.model.cfg, loaded.model.conn_cfg
    eos = loaded.tokenizer.eos_id if loaded.tokenizer.eos_id >= 0 else None
    return {
        "architectures": ["MHCForCausalLM"],
        "model_type": "mhc_train",
        "auto_map": AUTO_MAP,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": head_dim(cfg),
        "intermediate_size": ffn_hidden_dim(cfg),
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "connection": {**dataclasses.asdict(conn), "n_streams": site_streams(loaded)},
        "attention_bias": cfg.qkv_bias,
        "qk_norm": cfg.qk_norm,
        "mhc_rope_scaling": rope_scaling(cfg),
        "tie_word_embeddings": False,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32",
        "mhc_train": {
            "checkpoint": str(loaded.path),
            "step": loaded.step,
            "model": dataclasses.asdict(cfg),
            "connection": dataclasses.asdict(conn),
        },  # fmt: skip
        **mla_config(cfg),  # MLA models only
        **moe_config(cfg),  # MoE models only
    }


def site_streams(loaded: Loaded) -> int:
    """n of the connection sites: 1 for the residual, the model's stream count otherwise (single-pass: its n, not the
    n + 1 rows of its state)."""
    conn = loaded.model.conn
    return getattr(conn, "n", None) or loaded.model.n_streams


def moe_config(cfg) -> dict:
    """MoE's keys of config.json (model.ffn and model.moe.*); none for a dense model, whose export is unchanged."""
    return {"ffn": "moe", "moe": dataclasses.asdict(cfg.moe)} if getattr(cfg, "ffn", "dense") == "moe" else {}


def mla_config(cfg) -> dict:
    """MLA's keys of config.json (model.attention and model.mla.*); none for GQA, whose export is unchanged."""
    return {"attention": "mla", "mla": dataclasses.asdict(cfg.mla)} if cfg.attention == "mla" else {}


def rope_scaling(cfg) -> dict | None:
    if cfg.rope_scaling != "llama3":
        return None
    return {"factor": cfg.rope_scaling_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len}  # fmt: skip


def export_weights(loaded: Loaded) -> dict:
    """{transformers name: fp32 tensor}: the decoder's under `model.` (mhc-train's names), the head as `lm_head`."""
    out = {}
    for k, v in loaded.model.state_dict().items():
        name = "lm_head.weight" if k == "output.weight" else f"model.{k}"
        out[name] = v.detach().to("cpu", torch.float32).clone().contiguous()
    return out


HC_NAMES = ("mhc", "deepseek")


def _check_hc_names(loaded: Loaded, hc_names: str) -> None:
    conn = loaded.model.conn_cfg
    if hc_names not in HC_NAMES:
        raise InferenceError(f"--hc-names must be one of {HC_NAMES}, got {hc_names!r}")
    if hc_names == "deepseek" and conn.type not in ("mhc", "mhc_single_pass"):
        raise InferenceError(f"--hc-names deepseek maps mHC sites; this is a {conn.type} model: use --hc-names mhc")


def export(loaded: Loaded, out_dir: str | Path, overwrite: bool = False, hc_names: str = "mhc") -> Path:
    """Write the export directory for `loaded`; returns its path. `hc_names`: mhc (ours) | deepseek (see the module)."""
    from safetensors.torch import save_file

    _check_hc_names(loaded, hc_names)
    out = Path(out_dir)
    cfg = loaded.model.cfg
    if getattr(cfg, "ffn", "dense") == "moe" and cfg.moe.capacity_factor:
        raise InferenceError(f"model.moe.capacity_factor={cfg.moe.capacity_factor} drops tokens by batch position, "
                             "which a KV-cached export cannot reproduce; export dropless MoE models (capacity 0)")  # fmt: skip
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InferenceError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(loaded)
    weights = export_weights(loaded)
    if hc_names == "deepseek":
        weights = deepseek_map.to_deepseek(weights)
        config = {k: v for k, v in config.items() if k != "auto_map"}
        config.update(hc_names="deepseek", **deepseek_map.deepseek_config_values(loaded.model.conn_cfg))
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(HF_DIR / name, tmp / name)
    if hasattr(loaded.tokenizer, "sp"):
        write_sentencepiece_tokenizer(loaded.tokenizer, tmp)
    else:
        write_fast_tokenizer(loaded.tokenizer, tmp)
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"], "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_sentencepiece_tokenizer(tokenizer, tmp: Path) -> None:
    """MHCTokenizer (tokenization_mhc.py) around the run's sentencepiece model."""
    shutil.copyfile(HF_DIR / "tokenization_mhc.py", tmp / "tokenization_mhc.py")
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    sp = tokenizer.sp
    eos = sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok_cfg = {
        "tokenizer_class": "MHCTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_mhc.MHCTokenizer", None]},
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": eos,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": eos, "unk_token": unk, "pad_token": eos}) + "\n"
    )


def write_fast_tokenizer(tokenizer, tmp: Path) -> None:
    """A run tokenised with a Hugging Face tokenizer.json: that file, loaded as transformers' PreTrainedTokenizerFast
    (its own post-processor decides what `tokenizer(text)` adds; mhc-train encodes without special tokens)."""
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
    eos = tokenizer.eos_token
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": eos}) + "\n")
