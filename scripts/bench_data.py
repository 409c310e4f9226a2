"""Data recipe costs (issue 29): loader throughput of a 3-source blend against one source, and the training step with
and without per-document attention masking.

    .venv/bin/python scripts/bench_data.py                      # CPU: loader + the step at seq 512
    .venv/bin/python scripts/bench_data.py --device cuda        # the step on the GPU too (the loader stays on host)
    .venv/bin/python scripts/bench_data.py --steps 50 --seq-len 1024 --batch-size 8

- Sources: the bundled plays cut in three groups by name (a line a document, as data.txt_per_line=true, and also a
  play a document for the masking part), prepared once into a temporary out_dir with one `--vocab-size` tokenizer
  trained on the weighted sample (the blend's own path). "One source" is the first group on its own.
- Each measurement runs `--rounds` times, the kinds interleaved, and keeps its best round (the machine may be shared).
- Loader: `train_batch(seed, step, 0, B, T)` for `--loader-steps` steps (what the trainer's prefetch thread calls); windows
  per second and the 20/50/80% quantiles of one batch's time.
- Step: forward + backward of the `--model` preset (mHC, torch backend) on the same packed batches, documents masked
  (data.document_mask=true, RoPE restarted) or not; the quantiles of the step time and the mean document length.
  The masked step runs SDPA with a boolean mask (document_mask) and, on CUDA where torch has it, flex_attention
  (document_mask_flex); the attention kernels alone are timed by scripts/bench_document_attention.py.

Writes benchmarks/results/bench_data_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mhc_train.config import ConnectionConfig, DataConfig, load_config  # noqa: E402
from mhc_train.config.schema import BlendSourceConfig  # noqa: E402
from mhc_train.data.blend import prepare_blend  # noqa: E402
from mhc_train.data.sources import bundled_shakespeare_files  # noqa: E402
from mhc_train.model.documents import flex_available  # noqa: E402
from mhc_train.model.transformer import build_model  # noqa: E402

GROUPS = ("abcdefghij", "klmnopqr", "stuvwxyz")  # plays by first letter: three sources of similar size


def _sources(root: Path) -> list[Path]:
    dirs = []
    for i, letters in enumerate(GROUPS):
        d = root / f"src{i}"
        d.mkdir()
        for f in bundled_shakespeare_files():
            if f.name[0] in letters:
                (d / f.name).write_bytes(f.read_bytes())
        dirs.append(d)
    return dirs


def _prepare(dirs, out: Path, per_line: bool, weights, vocab: int, tokenizer: str = ""):
    entries = [BlendSourceConfig(source=str(d), weight=w) for d, w in zip(dirs, weights)]
    cfg = DataConfig(
        out_dir=str(out), vocab_size=vocab, txt_per_line=per_line, blend=entries, tokenizer_model=tokenizer
    )
    return prepare_blend(cfg, 0, lambda v: [v])[0]


def _quantiles(times: list[float]) -> dict:
    q = np.quantile(np.array(times) * 1e3, [0.2, 0.5, 0.8])
    return {"ms_p20": round(q[0], 3), "ms_p50": round(q[1], 3), "ms_p80": round(q[2], 3)}


def bench_loader(data, steps: int, batch: int, seq: int) -> dict:
    data.train_batch(0, 0, 0, batch, seq)  # page the shards in
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        data.train_batch(0, step, 0, batch, seq)
        times.append(time.perf_counter() - t0)
    return {"windows_per_s": round(batch / float(np.mean(times)), 1), **_quantiles(times)}


def bench_step(data, model_preset: str, device: str, steps: int, batch: int, seq: int, mask: str | None) -> dict:
    """`mask`: None (no document mask) or the data.document_mask_kernel ("sdpa" or "flex")."""
    cfg = load_config([f"model={model_preset}", f"model.max_seq_len={seq}", f"train.seq_len={seq}"])
    cfg.model.vocab_size = data.vocab_size
    model = build_model(cfg.model, ConnectionConfig(type="mhc", n_streams=4, backend="torch"), device=device)
    if mask:
        model.use_documents(int(data.manifest["tokenizer"]["eos_id"]), restart_rope=True, kernel=mask)
    batches = [data.train_batch(1, s, 0, batch, seq) for s in range(steps + 2)]
    eos = data.manifest["tokenizer"]["eos_id"]
    doc_len = float(np.mean([seq / (1 + int((x[:, :-1] == eos).sum(1).float().mean())) for x, _ in batches]))
    times = []
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x, y).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return {"mean_doc_tokens": round(doc_len, 1), "tokens_per_s": round(batch * seq / float(np.mean(times))),
            **_quantiles(times)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--loader-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--step-batch-size", type=int, default=4)
    p.add_argument("--model", default="demo", help="model preset of the step measurement (configs/model/)")
    p.add_argument("--vocab-size", type=int, default=4096, help="the BPE trained on the weighted sample")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the best of each kind is kept")
    args = p.parse_args()
    torch.manual_seed(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _sources(Path(tmp))
        blend = _prepare(dirs, Path(tmp) / "lines", True, (0.5, 0.3, 0.2), args.vocab_size)
        one = blend.parts[0]
        b, t = args.batch_size, args.seq_len
        rounds = {"one_source": [], "blend_3_sources": []}
        for _ in range(args.rounds):  # interleaved, the best round of each kept: neighbours on a shared machine
            for key, data in (("one_source", one), ("blend_3_sources", blend)):
                rounds[key].append(bench_loader(data, args.loader_steps, b, t))
        results["loader"] = {k: max(v, key=lambda r: r["windows_per_s"]) for k, v in rounds.items()}
        ld = results["loader"]
        ld["blend_vs_one"] = round(ld["blend_3_sources"]["windows_per_s"] / ld["one_source"]["windows_per_s"], 3)
        results["step"] = {}
        kinds = {"no_mask": None, "document_mask": "sdpa"}  # the document mask's kernel: data.document_mask_kernel
        if args.device == "cuda" and flex_available():
            kinds["document_mask_flex"] = "flex"
        for docs, per_line in (("line_documents", True), ("play_documents", False)):
            tok = blend.manifest["tokenizer"]["path"]  # the same tokenizer, the plays as whole documents
            data = (
                blend if per_line else _prepare(dirs, Path(tmp) / "plays", False, (0.5, 0.3, 0.2), args.vocab_size, tok)
            )
            row = {key: None for key in kinds}
            for _ in range(args.rounds):
                for key, mask in kinds.items():
                    r = bench_step(data, args.model, args.device, args.steps, args.step_batch_size, t, mask)
                    row[key] = r if row[key] is None or r["ms_p50"] < row[key]["ms_p50"] else row[key]
            row["mask_vs_no_mask_time"] = round(row["document_mask"]["ms_p50"] / row["no_mask"]["ms_p50"], 3)
            if "document_mask_flex" in row:
                row["flex_vs_no_mask_time"] = round(row["document_mask_flex"]["ms_p50"] / row["no_mask"]["ms_p50"], 3)
            results["step"][docs] = row
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **{k: v for k, v in vars(args).items()},
    }
    out = REPO / "benchmarks" / "results" / f"bench_data_{args.device}.json"
    out.write_text(json.dumps({"config": meta, "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
