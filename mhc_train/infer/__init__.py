"""Use a trained model: load a checkpoint for inference, generate with a KV cache, export to Hugging Face, evaluate
with lm-evaluation-harness. Only `mhc_train.cli` imports this package.

- `load.py`      a checkpoint (one file or DCP shards, any layout it was trained in) -> plain model + tokenizer
- `generate.py`  KV-cache decode: attention keys/values cached, the n-stream state and the connection coefficients
                 computed for the new tokens only (they are per-token functions); batched prompts, sampling
- `sites.py`     the connection sites as decode runs them: the same math in few ops per site (decode is dispatch-bound)
- `sinkhorn_cpu.py` mHC's Sinkhorn for decode as one call into a small C loop on CPU (torch loop without a compiler)
- `export.py`    a directory `transformers` loads with trust_remote_code (modeling code in `hf/`)
- `import_hf.py` `mhc-train import-hf`: a Llama / Qwen2 / Qwen3 checkpoint or an export as a step-0 run
                 (`upcycle.py`: the n-stream arms' function-preserving start; `stream_dcp.py`: shard by shard;
                 `import_deepseek.py`: an export with DeepSeek-V4's mHC names)
- `eval.py`      lm-evaluation-harness on a checkpoint or an export; bundled offline tasks in `tasks/`
"""

from mhc_train.infer.errors import InferenceError

__all__ = ["InferenceError"]
