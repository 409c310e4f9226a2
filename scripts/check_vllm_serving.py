"""Serve an mhc-train export with vLLM's Transformers backend (`model_impl="transformers"`) and compare its greedy
tokens with `mhc-train generate`'s; one JSON to --out. Run by scripts/gpu_check.sh on a lent GPU.

    python scripts/check_vllm_serving.py --out result.json [--arm mhc]

Without vLLM installed it writes {"status": "skipped", "reason": ...} and exits 0. The model is the test-size one of
the arm (random weights, a word-level tokenizer.json), so the check is the plumbing (remote code, attention
interface, cache, tokenizer), not quality. vLLM runs bf16; the tokens are compared and the share that agree before
the first difference is reported (random weights have near ties, so bf16 may part from fp32 early).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--arm", default="mhc", help="residual | hc | mhc")
    args = p.parse_args()
    out = Path(args.out)
    try:
        import vllm
    except ImportError as e:
        out.write_text(json.dumps({"status": "skipped", "reason": f"vLLM is not installed here ({e})"}) + "\n")
        print(f"skipped: vLLM is not installed ({e})")
        return 0
    from tokenizers import Tokenizer, models, pre_tokenizers

    from mhc_train.config import ConnectionConfig, ModelConfig
    from mhc_train.data.tokenizer import HFTokenizer
    from mhc_train.infer.export import export
    from mhc_train.infer.generate import SamplingConfig, generate
    from mhc_train.infer.load import Loaded
    from mhc_train.model import build_model

    root = Path(tempfile.mkdtemp())
    vocab = {f"t{i}": i for i in range(511)} | {"<|endoftext|>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    n = 1 if args.arm == "residual" else 4
    model = build_model(ModelConfig(vocab_size=512, dim=64, n_layer=2, n_head=4, max_seq_len=128),
                        ConnectionConfig(type=args.arm, n_streams=n, backend="torch"), seed=0).eval()  # fmt: skip
    tokenizer = HFTokenizer(root / "tokenizer.json")
    directory = export(Loaded(model, tokenizer, {}, root / "step.pt", 0), root / "export")
    prompts = ["t5 t17 t3 t94 t8", "t40 t2"]
    ours = generate(model, [tokenizer.encode(t) for t in prompts], SamplingConfig(max_new_tokens=16,
                                                                                   stop_at_eos=False))  # fmt: skip
    t0 = time.perf_counter()
    llm = vllm.LLM(model=str(directory), model_impl="transformers", trust_remote_code=True, dtype="bfloat16",
                   enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=128)  # fmt: skip
    params = vllm.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    served = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) / len(x) for x, y in zip(ours, served)]
    result = {"status": "ok", "vllm": vllm.__version__, "arm": args.arm, "seconds": round(time.perf_counter() - t0, 1),
              "ours": ours, "served": served, "agreeing_prefix_share": agree}  # fmt: skip
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
