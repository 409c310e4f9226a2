"""Export a checkpoint to a directory Hugging Face `transformers` loads (`trust_remote_code=True`).

<out>/
  config.json               MHCConfig: the model shape in transformers' names, `connection` = our ConnectionConfig
  model.safetensors         the weights, fp32, named `model.<mhc-train parameter name>`
  modeling_mhc.py           MHCConfig + MHCForCausalLM, all three arms (torch and transformers only)
  tokenization_mhc.py       MHCTokenizer (sentencepiece itself, so ids equal ours)
  tokenizer.model           the run's sentencepiece model
  tokenizer_config.json, special_tokens_map.json, generation_config.json

Notes:
- The directory is written under a temporary name and renamed, so a half-written export never carries the name.
- A tied LM head is written as its own copy (safetensors stores no aliases); config.json says tie_word_embeddings=false.
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
from mhc_train.model.transformer import ffn_hidden_dim, head_dim

HF_DIR = Path(__file__).parent / "hf"
AUTO_MAP = {"AutoConfig": "modeling_mhc.MHCConfig", "AutoModelForCausalLM": "modeling_mhc.MHCForCausalLM"}


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
        "connection": {**dataclasses.asdict(conn), "n_streams": loaded.model.n_streams},
        "tie_word_embeddings": False,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32",
        "mhc_train": {"checkpoint": str(loaded.path), "step": loaded.step},
    }


def export(loaded: Loaded, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the export directory for `loaded`; returns its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if getattr(loaded.model.cfg, "ffn", "dense") == "moe":
        raise InferenceError("export writes dense models only; model.ffn=moe is not exportable yet (generate works)")
    if not hasattr(loaded.tokenizer, "sp"):  # TODO: a tokenizer.json run could export with PreTrainedTokenizerFast
        raise InferenceError(
            f"export supports runs tokenised with sentencepiece only; {loaded.tokenizer.path} is a Hugging Face "
            "tokenizer.json. Load it with tokenizers.Tokenizer.from_file next to the model's weights instead"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InferenceError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = hf_config(loaded)
    weights = {
        f"model.{k}": v.detach().to("cpu", torch.float32).clone().contiguous()
        for k, v in loaded.model.state_dict().items()
    }
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("modeling_mhc.py", "tokenization_mhc.py"):
        shutil.copyfile(HF_DIR / name, tmp / name)
    shutil.copyfile(loaded.tokenizer.path, tmp / "tokenizer.model")
    sp = loaded.tokenizer.sp
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
    gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"], "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
