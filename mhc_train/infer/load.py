"""A checkpoint for inference: the plain model (fp32, eval mode, torch connection backend on CPU) and its tokenizer.

- A path is a step file (`checkpoints/step_XXXXXXXX.pt`) or a run directory (its newest checkpoint).
- Checkpoints are verified and read `weights_only` (`mhc_train.checkpoint`); DCP shards written under FSDP or a
  pipeline are read back into full tensors by parameter name, so every training layout loads the same way.
- The saved config is read under today's schema (`mhc_train.checkpoint.compat`): keys added since take their
  defaults, keys removed since are dropped with a one-line notice.
- The tokenizer is the run directory's copy (`tokenizer.model`), else the path the checkpoint recorded, else the one
  given; its sha256 must match the one recorded at training time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from mhc_train.checkpoint import CheckpointError, drop_removed, load_step_file, read_model_state
from mhc_train.config import ConnectionConfig, ModelConfig
from mhc_train.data.tokenizer import HFTokenizer, Tokenizer, file_sha256, load_tokenizer
from mhc_train.infer.errors import InferenceError
from mhc_train.io.rundir import RunDir
from mhc_train.model.transformer import Transformer


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer | HFTokenizer
    config: dict  # the resolved config the checkpoint was trained with (mhc_train.config.to_dict)
    path: Path  # the step file
    step: int

    @property
    def run_dir(self) -> RunDir:
        return RunDir.of_step_file(self.path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step file, or a run directory's newest step file."""
    path = Path(path)
    if path.is_dir():
        files = RunDir(path).step_files()
        if not files:
            raise InferenceError(
                f"{path} holds no checkpoint (no checkpoints/step_*.pt); train it first, or pass a step file"
            )
        return files[-1][1]
    if not path.is_file():
        raise InferenceError(f"checkpoint {path} does not exist; pass a run directory or a checkpoints/step_*.pt file")
    return path


def model_configs(config: dict) -> tuple[ModelConfig, ConnectionConfig]:
    """The model and connection configs of a resolved config dict; the connection runs the torch backend on CPU.
    Inference keeps the streams in fp32 whatever they were trained in (bf16 streams need bf16 autocast; fp32 is the
    more precise storage of the same weights)."""
    conn = {**config["connection"], "backend": "auto"}  # same math (tested): triton on CUDA, torch elsewhere
    return model_config({**config["model"], "stream_dtype": "fp32"}), ConnectionConfig(**conn)


def model_config(d: dict) -> ModelConfig:
    """A ModelConfig from its dict, each nested section (model.mla, ...) rebuilt as its dataclass; a section the
    saved config lacks (written before it existed) keeps its default."""
    hints = typing.get_type_hints(ModelConfig)
    nested = {k: hints[k](**v) for k, v in d.items() if isinstance(v, dict) and dataclasses.is_dataclass(hints.get(k))}
    return ModelConfig(**{**d, **nested})


def find_tokenizer(step_file: Path, recorded: dict, given: str | Path | None = None) -> Path:
    candidates = [Path(given)] if given else [RunDir.of_step_file(step_file).tokenizer, Path(recorded.get("path", ""))]
    found = next((p for p in candidates if str(p) and p.is_file()), None)
    if found is None:
        where = " nor ".join(str(p) for p in candidates if str(p))
        raise InferenceError(
            f"checkpoint {step_file} has no tokenizer: neither {where} exists. Pass the tokenizer (sentencepiece model or tokenizer.json) it was "
            "trained with (--tokenizer PATH), or copy it to <run_dir>/tokenizer.model"
        )
    want = recorded.get("sha256")
    if want and file_sha256(found) != want:
        raise InferenceError(
            f"tokenizer {found} is not the one checkpoint {step_file} was trained with (sha256 "
            f"{file_sha256(found)[:12]}, expected {want[:12]}); pass the original with --tokenizer PATH"
        )
    return found


def load_checkpoint(path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu") -> Loaded:
    """Verify and load a checkpoint (any format, any training layout) into a plain fp32 model in eval mode."""
    step_file = resolve_checkpoint(path)
    try:
        state = load_step_file(step_file)
        weights = state["model"] if "model" in state else read_model_state(step_file)  # DCP, DeepSpeed: from shards
    except CheckpointError as e:
        raise InferenceError(str(e)) from e
    config = state.get("config") or {}
    if "model" not in config or "connection" not in config:
        raise InferenceError(f"checkpoint {step_file} records no model config; it was not written by mhc-train train")
    config = drop_removed(config, f"checkpoint {step_file}")
    tok = load_tokenizer(find_tokenizer(step_file, state.get("tokenizer") or {}, tokenizer))
    model_cfg, conn_cfg = model_configs(config)
    if tok.vocab_size > model_cfg.vocab_size:
        raise InferenceError(
            f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is {model_cfg.vocab_size}; "
            "pass the tokenizer the checkpoint was trained with"
        )
    with torch.device(device):
        model = Transformer(model_cfg, conn_cfg)  # allocates only (the constructor draws nothing); rope is computed
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return Loaded(model.eval(), tok, config, step_file, int(state.get("step", 0)))
