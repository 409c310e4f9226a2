"""`mhc-train import-hf DIR --connection ARM --out RUN_DIR`: a Hugging Face Llama / Qwen2 / Qwen3 checkpoint (or an
mhc-train export) as a step-0 run that `mhc-train train` continues from.

RUN_DIR/
  checkpoints/step_00000000.pt  the resolved config, a fresh schedule, the shards' digests (or, --format file, the
                                weights and the optimizer state themselves)
  checkpoints/dcp/step_00000000/  the weights (fp32) and a fresh AdamW state as torch DCP, one part per source shard
  hf_import.yaml                model, connection, data.tokenizer_model and run_dir: `train --config` this file
  tokenizer.json, tokenizer.model  the source's tokenizer.json (the second name is the run directory's copy)

Notes:
- Config: hidden_size -> model.dim, num_key_value_heads -> n_kv_head (GQA), intermediate_size -> ffn_hidden_dim,
  rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_embeddings, Qwen2's q/k/v biases -> qkv_bias, Qwen3's q/k
  norm -> qk_norm, rope_theta and Llama 3's rope scaling (transformers 4's `rope_scaling` or 5's
  `rope_parameters`). What the model cannot hold (other RoPE types, sliding windows, an output bias, a non-SiLU
  MLP) is refused, naming the key.
- RoPE: transformers rotates the halves (x_i, x_{i+D/2}) of each head, mhc-train the pairs (x_{2i}, x_{2i+1}), with
  the same frequency i. The q/k rows (and biases, and the q/k norm gains) of each head are permuted on import
  (`to_pairs`), and back on export (`to_halves`); q.k is unchanged, so the logits are.
- Weights are read one safetensors shard at a time (a sharded checkpoint's index names the shards) and converted to
  fp32. With --format dcp (the default) each shard's tensors, with their zero AdamW moments, are written as one part
  of the DCP checkpoint and dropped (`stream_dcp.py`; the model exists only on the meta device, its connection
  sites on the CPU): the process holds one converted shard at a time. --format file builds the whole model on
  the CPU and writes one step file. `train` resumes either (tested in one process).
- The connection arm's sites are set for a function-preserving start (`upcycle.py`); `residual` equals the source.
  An upcycled arm (a one-stream source, an n-stream arm) gets `optim.connection_warmup_steps` (--connection-warmup,
  default 100): the new connection's LR ramps from 0 while the imported weights train at the schedule's LR. It is in
  the step file's config and in hf_import.yaml; residual and an export read in its own arm keep 0.
- An mhc-train export (`MHCForCausalLM`) is read back under its own names, model (MLA and MoE sections included)
  and connection, an MoE layer's balancing bias (a buffer) with the weights; one written with
  `export --hc-names deepseek` (config.json `hc_names: deepseek`) has its mHC sites and learned collapse mapped back
  from DeepSeek-V4's names and layouts (`import_deepseek.py`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from mhc_train.config import load_config, to_dict
from mhc_train.infer.errors import InferenceError
from mhc_train.infer.import_deepseek import check_deepseek_fields, from_deepseek_names, hc_names_of
from mhc_train.infer.upcycle import DEFAULT_SKEW, upcycle
from mhc_train.io.rundir import RunDir
from mhc_train.model.transformer import Transformer, head_dim

DEFAULT_CONNECTION_WARMUP = 100  # steps of the upcycled connection's LR ramp (optim.connection_warmup_steps)
ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MHCForCausalLM")
LAYER_NAMES = {  # transformers' name under model.layers.<i>. -> ours under layers.<i>.
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "ffn.w1",
    "mlp.up_proj": "ffn.w3",
    "mlp.down_proj": "ffn.w2",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise InferenceError(f"{src} has no config.json; pass a Hugging Face model directory (save_pretrained)")
    hf = json.loads(path.read_text())
    arch = (hf.get("architectures") or [""])[0]
    if arch not in ARCHITECTURES:
        raise InferenceError(f"{src}: architecture {arch or '(none)'} is not importable; supported: "
                             f"{', '.join(ARCHITECTURES)}")  # fmt: skip
    return hf


def rope_overrides(hf: dict) -> dict:
    """model.rope_* of a transformers config (4: rope_theta + rope_scaling; 5: rope_parameters)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))  # fmt: skip
    elif kind != "default":
        raise InferenceError(f"rope type {kind!r} is not supported (default and llama3 are); this model cannot be "
                             "imported")  # fmt: skip
    return out


def model_overrides(hf: dict) -> dict:
    """The ModelConfig values of a transformers config (refusing what the model cannot hold)."""
    arch = hf["architectures"][0]
    if arch == "MHCForCausalLM":
        if "model" not in hf.get("mhc_train", {}):
            raise InferenceError("this export predates import-hf (its config.json records no mhc_train.model); "
                                 "export the checkpoint again with this version")  # fmt: skip
        return dict(hf["mhc_train"]["model"])
    for key, bad in (("hidden_act", lambda v: v not in (None, "silu")), ("mlp_bias", bool),
                     ("use_sliding_window", bool)):  # fmt: skip
        if bad(hf.get(key)):
            raise InferenceError(f"config.json {key}={hf.get(key)!r} is not supported; this model cannot be imported")
    if hf.get("attention_bias") and arch != "Qwen2ForCausalLM":
        raise InferenceError("config.json attention_bias=true puts a bias on the output projection too, which "
                             "mhc-train's attention lacks; this model cannot be imported")  # fmt: skip
    rope, heads = rope_overrides(hf), hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "dim": hf["hidden_size"],
        "n_layer": hf["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn_hidden_dim": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
        "qkv_bias": arch == "Qwen2ForCausalLM",
        "qk_norm": arch == "Qwen3ForCausalLM",
        **rope,
    }


def pair_permutation(head_dim: int) -> torch.Tensor:
    """Index p of mhc-train's head layout -> transformers' index: pair i = (halves[i], halves[i + D/2])."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def to_pairs(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q/k (weight [H*D, C], bias [H*D], norm gain [D]) from rotate-half order to mhc-train's pairs."""
    return t.unflatten(0, (-1, head_dim))[:, pair_permutation(head_dim)].flatten(0, 1)


def to_halves(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `to_pairs` (export for transformers' layout)."""
    return t.unflatten(0, (-1, head_dim))[:, torch.argsort(pair_permutation(head_dim))].flatten(0, 1)


def our_name(name: str) -> str | None:
    """mhc-train's parameter name of a transformers tensor name (None: not a weight we hold, e.g. rotary buffers)."""
    stem, _, leaf = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{leaf}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"layers.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{leaf}"
    if "rotary_emb" in name:
        return None
    raise InferenceError(f"tensor {name} has no place in mhc-train's model; this checkpoint cannot be imported")


def shard_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [src / n for n in names]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    raise InferenceError(f"{src} holds no model.safetensors (nor an index of shards); save the model with "
                         "safe_serialization (the default of save_pretrained)")  # fmt: skip


def converted_shards(src: Path, hf: dict, head_dim: int) -> Iterator[tuple[Path, dict]]:
    """(shard, {our name: fp32 tensor}) one shard at a time; q/k rows permuted to mhc-train's RoPE pairs."""
    from safetensors import safe_open

    ours = hf["architectures"][0] == "MHCForCausalLM"
    deepseek, pending = ours and hc_names_of(hf) == "deepseek", {}
    for path in shard_files(src):
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).float()
                if ours:  # an mhc-train export: its decoder under model.<our name>, the head as lm_head
                    out["output.weight" if name == "lm_head.weight" else name.removeprefix("model.")] = t
                    continue
                key = our_name(name)
                if key is None:
                    continue
                if key.rsplit(".", 2)[-2] in ("wq", "wk", "q_norm", "k_norm"):
                    t = to_pairs(t, head_dim)
                out[key] = t.contiguous()
        yield path, from_deepseek_names(out, pending) if deepseek else out
    if pending:
        raise InferenceError(f"{src}: DeepSeek-named site tensors without their site's fn, base and scale, e.g. "
                             f"{sorted(pending)[:3]}; the export is incomplete")  # fmt: skip


def fitting(src, tensors: dict, params: dict, tied: bool) -> dict:
    """One converted shard's tensors, each checked against the model's parameter of that name and shape (one line
    naming the tensor otherwise); a tied model's separate head is dropped (transformers may store both)."""
    out = {}
    for key, t in tensors.items():
        if key == "output.weight" and tied:
            continue
        if key not in params or params[key].shape != t.shape:
            got = tuple(params[key].shape) if key in params else "no such parameter"
            raise InferenceError(f"{src}: tensor {key} {tuple(t.shape)} does not fit the model ({got})")
        out[key] = t
    return out


def weight_targets(model: Transformer) -> dict[str, torch.Tensor]:
    """What a source tensor may fill, by name: every parameter (a tied one under both names) and every persistent
    buffer (an MoE layer's balancing bias `ffn.expert_bias`, which an MoE export carries)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in params}
    return {**params, **buffers}


def load_weights(model: Transformer, src: Path, hf: dict) -> set[str]:
    """Fill `model` from the shards of `src`, one shard at a time; returns the names filled. Every parameter must be
    covered, the connection sites' only where the source has any (an mhc-train export of an n-stream arm)."""
    params = weight_targets(model)
    seen: set[str] = set()
    tied = model.cfg.tie_embeddings
    with torch.no_grad():
        for _, tensors in converted_shards(src, hf, head_dim(model.cfg)):
            for key, t in fitting(src, tensors, params, tied).items():
                params[key].copy_(t)
                seen.add(key)
    has_sites = any("_conn." in k for k in seen)
    missing = sorted(k for k in params if k not in seen and ("_conn." not in k or has_sites))
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing:
        raise InferenceError(f"{src} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    return seen


def import_config(hf: dict, connection: str | None, out: Path, connection_warmup: int = DEFAULT_CONNECTION_WARMUP):
    """The resolved Config of the imported run: the source's model, the arm (`connection`: a configs/connection
    preset; None: an export's own arm, else residual), the source's tokenizer; an upcycled arm's connection LR
    warm-up (`connection_warmup` steps)."""
    from dataclasses import asdict

    from mhc_train.config import ConnectionConfig, validate_connection, validate_model
    from mhc_train.infer.load import model_config

    export_conn = hf.get("mhc_train", {}).get("connection") if hf["architectures"][0] == "MHCForCausalLM" else None
    if export_conn and export_conn.get("type") != "residual" and connection not in (None, export_conn.get("name")):
        raise InferenceError(f"this export is the {export_conn.get('name') or export_conn['type']} arm; import it "
                             "as that arm (omit --connection): only a residual model is upcycled to another arm")  # fmt: skip
    arm = connection or (export_conn or {}).get("name") or "residual"
    cfg = load_config([f"connection={arm}", f"run_dir={out}", f"data.tokenizer_model={out / 'tokenizer.json'}"])
    cfg.model = model_config({**asdict(cfg.model), **model_overrides(hf)})  # nested sections (mla, moe) rebuilt
    if hf["architectures"][0] != "MHCForCausalLM":  # the tokenizer may have fewer pieces than the embedding rows
        cfg.model.vocab_padded = True
    if export_conn and connection is None:
        cfg.connection = ConnectionConfig(**export_conn)
        check_deepseek_fields(hf, cfg.connection)
    validate_model(cfg.model)
    validate_connection(cfg.connection)
    if connection_warmup < 0:
        raise InferenceError(f"--connection-warmup {connection_warmup}: give a number of steps >= 0 (0: no ramp)")
    one_stream_source = not export_conn or export_conn.get("type") == "residual"
    if one_stream_source and cfg.connection.type != "residual":  # upcycled: the new connection warms up
        cfg.optim.connection_warmup_steps = connection_warmup
    return cfg


def import_hf(src: str | Path, connection: str | None, out: str | Path, skew: float = DEFAULT_SKEW,
              overwrite: bool = False, fmt: str = "dcp",
              connection_warmup: int = DEFAULT_CONNECTION_WARMUP) -> Path:  # fmt: skip
    """Write the step-0 run directory `out` from the Hugging Face directory `src`; returns the step file. `fmt`:
    dcp (streamed, one source shard in memory at a time) or file (the whole model in one step file);
    `connection_warmup`: optim.connection_warmup_steps of an upcycled arm."""
    src, out = Path(src), Path(out).absolute()
    hf = read_hf_config(src)
    if not (src / "tokenizer.json").is_file():
        raise InferenceError(f"{src} has no tokenizer.json; the run needs the model's own tokenizer (save it with "
                             "the model: tokenizer.save_pretrained)")  # fmt: skip
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InferenceError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if fmt not in ("dcp", "file"):
        raise InferenceError(f"--format {fmt!r}: choose dcp (streamed, sharded) or file (one step file)")
    cfg = import_config(hf, connection, out, connection_warmup)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # renamed into place when complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer.json", RunDir(tmp).tokenizer.name):
        shutil.copyfile(src / "tokenizer.json", tmp / name)
    try:
        if fmt == "file":
            model = Transformer(cfg.model, cfg.connection)  # on the CPU (to_empty from meta would untie a tied head)
            model.init_weights(cfg.train.seed)  # the sites' own values first; the source's weights overwrite the rest
            if not any("_conn." in k for k in load_weights(model, src, hf)):  # a one-stream source: its function
                upcycle(model, skew)
            body = file_body(model, cfg)
        else:
            body = stream_dcp_body(src, hf, cfg, RunDir(tmp), skew)
        write_step_zero(body, cfg, tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return RunDir(out).step_file(0)


def file_body(model: Transformer, cfg) -> dict:
    """What a file-format step file holds beside the common keys: the weights and a fresh optimizer's state."""
    from mhc_train.parallel.state import optimizer_state_by_name

    optimizer, scheduler = fresh_optimizer(model, cfg)
    names = {p: n for n, p in model.named_parameters()}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer_state_by_name(optimizer, names), "scheduler": scheduler.state_dict(),
            "dcp": None}  # fmt: skip


def fresh_optimizer(model: Transformer, cfg):
    from mhc_train.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.optim)
    return optimizer, build_scheduler(optimizer, cfg.train.max_steps, cfg.schedule, cfg.optim.connection_warmup_steps)


def stream_dcp_body(src: Path, hf: dict, cfg, run: RunDir, skew: float) -> dict:
    """The weights as a DCP checkpoint written one source shard at a time (`stream_dcp.StreamingDcp`), each with
    its parameters' fresh AdamW state (zero moments, step 0); the model is built on the meta device, only the
    connection sites (a few parameters per site) on the CPU. Returns the step file's DCP keys."""
    from mhc_train.checkpoint import integrity
    from mhc_train.infer.stream_dcp import StreamingDcp
    from mhc_train.model.connections import Site
    from mhc_train.parallel.state import optimizer_groups_by_name

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.connection)
    for name, mod in model.named_modules():
        if isinstance(mod, Site) and any(True for _ in mod.parameters()):
            mod.to_empty(device="cpu")
            with torch.no_grad():
                for key, value in model.initial_values(name, mod, cfg.train.seed).items():
                    getattr(mod, key).copy_(value)
    params = weight_targets(model)
    trained = {n for n, _ in model.named_parameters()}  # a tied head is the embedding's parameter
    tag, tied = run.tag(0), cfg.model.tie_embeddings
    writer, seen = StreamingDcp(run.dcp_dir(tag)), set()

    def write(part: dict) -> None:
        optim = {k: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                 for k, v in part.items() if k in trained}  # fmt: skip
        writer.add({"model": part, "optim": optim})
        seen.update(part)

    for _, tensors in converted_shards(src, hf, head_dim(cfg.model)):
        part = fitting(src, tensors, params, tied)
        if tied and "tok_embeddings.weight" in part:
            part["output.weight"] = part["tok_embeddings.weight"]
        if part:
            write(part)
    if not any("_conn." in k for k in seen):  # a one-stream source: start as its function
        upcycle(model, skew)
    sites = {k: v.detach() for k, v in model.state_dict().items() if "_conn." in k and k not in seen}
    if sites:
        write(sites)
    missing = sorted(set(model.state_dict()) - seen)
    if missing:
        raise InferenceError(f"{src} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    writer.close()
    optimizer, scheduler = fresh_optimizer(model, cfg)
    directory = run.dcp_dir(tag)
    files = integrity.digest_files(directory, integrity.files_under(directory))
    return {"dcp": tag, "scheduler": scheduler.state_dict(), "optimizer_groups": optimizer_groups_by_name(optimizer),
            "shards": {"dir": str(directory.relative_to(run.checkpoints)), "files": files}}  # fmt: skip


def write_step_zero(body: dict, cfg, tmp: Path, out: Path) -> Path:
    """The step-0 step file (`body` plus the keys every step file holds) written in `tmp`, naming `out`, the run
    directory it is renamed to, as its home; and hf_import.yaml, the config `train --config` takes."""
    from omegaconf import OmegaConf

    from mhc_train.checkpoint.rng import rng_state
    from mhc_train.checkpoint.stepfile import write_step_file
    from mhc_train.data.tokenizer import file_sha256

    run, config = RunDir(tmp), to_dict(cfg)
    tok = out / "tokenizer.json"
    state = {**body, "step": 0, "rng": rng_state(), "config": config, "deepspeed_tag": None, "world_size": 1,
             "skipped_steps": 0, "data": {"seed": cfg.train.seed, "next_step": 0},
             "tokenizer": {"path": str(tok), "sha256": file_sha256(tmp / "tokenizer.json")}}  # fmt: skip
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    path = write_step_file(run.temp_file(0, os.getpid()), run.step_file(0), state)
    keep = {"run_dir": str(out), "model": config["model"], "connection": config["connection"],
            "data": {"tokenizer_model": str(tok)},
            "optim": {"connection_warmup_steps": cfg.optim.connection_warmup_steps}}  # fmt: skip
    (tmp / "hf_import.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(keep)))
    return path
