"""Per-document attention alone (issue 29, data.document_mask_kernel): SDPA with the block-diagonal causal boolean
mask against flex_attention with a BlockMask, plus plain causal attention (flash on CUDA) as the floor.

    python scripts/bench_document_attention.py --out bench_document_attention.json          # CUDA where present
    python scripts/bench_document_attention.py --device cpu --cases 256x2 --doc-lens 32     # CPU: forward only

- Inputs: q [B, H, T, D], k, v [B, H_kv, T, D] (grouped-query, as the model's attention calls it), bf16 on CUDA and
  fp32 on CPU; documents of seeded random lengths around --doc-lens (uniform in [len/2, 3 len/2]), the same for
  every kernel. The layouts come from `mhc_train.model.documents.document_layout` (the model's own code); building
  one is timed apart (once per batch, then shared by every layer).
- Timed per kernel: forward + backward of sum(y * g) on CUDA; forward only on CPU (torch's CPU flex_attention has no
  backward). flex_attention runs as the model runs it: compiled once on CUDA, eager on CPU. Warm-up calls first.
- Checked: the max abs difference of flex against sdpa in the output and, on CUDA, in dq, dk, dv (the gradient check
  the CPU tests cannot run).
- The JSON is rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mhc_train.model.documents import document_layout, flex_available  # noqa: E402


def doc_ids(batch: int, seq: int, mean_len: int, seed: int) -> torch.Tensor:
    """[B, T] nondecreasing document ids: lengths drawn uniformly in [mean/2, 3 mean/2], the last one cut short."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(torch.randint(max(1, mean_len // 2), mean_len * 3 // 2 + 1, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq])
    return torch.stack(rows)


def _time(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` calls after `warmup` calls."""
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(times)[len(times) // 2], 3)


def bench_case(device, batch, seq, heads, kv_heads, head_dim, mean_len, iters, warmup) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    train = device.type == "cuda"  # CPU flex has no backward
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, generator=g).to(device, dtype).requires_grad_(train)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(device, dtype).requires_grad_(train)
            for _ in range(2))  # fmt: skip
    up = torch.randn(batch, heads, seq, head_dim, generator=g).to(device, dtype)
    ids = doc_ids(batch, seq, mean_len, seed=seq + mean_len).to(device)
    row: dict = {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                 "mean_doc_len": round(seq * batch / float(sum(int(r.max()) + 1 for r in ids)), 1)}  # fmt: skip
    kernels = ["causal", "sdpa"] + (["flex"] if flex_available() else [])
    layouts = {kind: document_layout(ids, kernel=kind) for kind in kernels[1:]}
    outputs = {}

    def step(kind):
        def run():
            if kind == "causal":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            elif kind == "flex":
                y = layouts[kind].flex(q, k, v, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=layouts[kind].mask, enable_gqa=True)
            if train:
                for t in (q, k, v):
                    t.grad = None
                (y * up).sum().backward()
            outputs[kind] = (y.detach(), *([t.grad for t in (q, k, v)] if train else []))

        return run

    with torch.set_grad_enabled(train):
        for kind in kernels:
            row[f"{kind}_ms"] = _time(step(kind), device, iters, warmup)
            if kind != "causal":
                row[f"{kind}_layout_ms"] = _time(lambda kind=kind: document_layout(ids, kernel=kind), device, iters, 1)
    if "flex" in outputs:
        names = ("out", "dq", "dk", "dv")[: len(outputs["flex"])]
        row["flex_vs_sdpa_max_abs_diff"] = {
            n: float((a.float() - b.float()).abs().max()) for n, a, b in zip(names, outputs["flex"], outputs["sdpa"])
        }
        row["flex_vs_sdpa_time"] = round(row["flex_ms"] / row["sdpa_ms"], 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--cases", default="2048x8,8192x2", help="SEQxBATCH, comma-separated")
    p.add_argument("--doc-lens", default="256,1024", help="mean document lengths, comma-separated")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_document_attention.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    report = {
        "config": {
            **vars(args),
            "torch": torch.__version__,
            "flex_available": flex_available(),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "mode": "forward+backward" if device.type == "cuda" else "forward",
        },
        "results": [],
    }
    for case in args.cases.split(","):
        seq, batch = (int(n) for n in case.split("x"))
        for mean_len in (int(n) for n in args.doc_lens.split(",")):
            row = bench_case(device, batch, seq, args.heads, args.kv_heads, args.head_dim, mean_len, args.iters,
                             args.warmup)  # fmt: skip
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
