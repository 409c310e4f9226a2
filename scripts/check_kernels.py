"""Compile gate: every Triton kernel specialization a user can reach, compiled ahead of time for H100 (sm_90) and
B200 (sm_100) with Triton's bundled ptxas; no GPU, no driver. Run by `make test`.

    .venv/bin/python scripts/check_kernels.py                 # the full matrix, JSON to benchmarks/results/
    .venv/bin/python scripts/check_kernels.py --n 4 --arch 90 # a subset

The matrix: arms mhc, mhc_identity, hc, mhc_single_pass (`--arms` picks some) and the standalone Sinkhorn op, every autotune candidate of each launch; n in 1, 2, 4, 8, 16; C in 4096, 1280, 192 and
an odd 67; fp32 and bf16 streams; both Sinkhorn backwards. Launches are recorded on `meta`
tensors through `mhc_train.ops` (mhc_train/ops/audit.py), forward and backward, then deduplicated by what the
compiler sees (C is a runtime argument, so most widths share a specialization). Fails (exit 1) on a compile error,
shared memory over the chip's limit, or any register spill; prints registers, spills, shared memory and occupancy
per specialization. Reports are cached by specialization in ~/.cache/mhc_aot (MHC_AOT_CACHE); CI starts cold, so
the compiles run in one forked worker per core (--jobs), and ptxas runs once per kernel (its -v log is taken from
Triton's own cubin step). The summary gives wall and CPU seconds.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the gate compiles real kernels; set before anything imports triton
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matrix(ns, widths, dtypes):
    """Every (arm, n, C, dtype, sinkhorn_backward, chained or not, split backward or not) a config can
    reach: a model site links its ops (one dx per site); selective recomputation calls them unlinked; the split-backward
    pipeline schedules run a backward in two passes."""
    for arm, n, C, dt in itertools.product(("mhc", "mhc_identity", "hc"), ns, widths, dtypes):
        yield dict(arm=arm, n=n, C=C, stream_dtype=DTYPES[dt], chain=False)
        yield dict(arm=arm, n=n, C=C, stream_dtype=DTYPES[dt], split_backward=True)  # ZBV / DualPipeV
        if arm == "mhc":
            for sb in ("unrolled", "implicit"):
                yield dict(arm=arm, n=n, C=C, stream_dtype=DTYPES[dt], sinkhorn_backward=sb)
        else:
            yield dict(arm=arm, n=n, C=C, stream_dtype=DTYPES[dt])
    for n in ns:
        yield dict(arm="sinkhorn", n=n, C=1)
    for n, C, dt in itertools.product(ns, widths, [d for d in dtypes if d == "fp32"]):  # the single-pass arm (it
        for tail in ("unrolled", "deepseek_v4"):  # refuses bf16 streams): fused read and write, both coefficient tails
            yield dict(arm="mhc_single_pass", n=n, C=C, stream_dtype=DTYPES[dt], sinkhorn_backward=tail)
        # the plain write (a stage's last site; the chained case above fuses the write with the next site's read)
        yield dict(
            arm="mhc_single_pass", n=n, C=C, stream_dtype=DTYPES[dt], sinkhorn_backward="deepseek_v4", chain=False
        )


def unique_launches(cases, archs):
    """{specialization key (per arch): (launch, [case ids])}."""
    from mhc_kernels.aot import specialization_key
    from mhc_train.ops.audit import site_launches

    seen: dict = {}
    for case in cases:
        fwd, bwd = site_launches(**case, tokens=4096, alternates=True)  # every autotune candidate
        cid = "{arm}-n{n}-C{C}".format(**case) + (
            f"-{str(case['stream_dtype']).split('.')[-1]}" if "stream_dtype" in case else ""
        )
        if case.get("sinkhorn_backward") in ("implicit", "deepseek_v4"):
            cid += f"-{case['sinkhorn_backward']}"
        if case.get("chain") is False:
            cid += "-unchained"
        if case.get("split_backward"):
            cid += "-split"
        for launch in fwd + bwd:
            for arch in archs:
                key = specialization_key(launch, arch)
                seen.setdefault(key, (launch, arch, []))[2].append(cid)
    return seen


_JOBS: list = []  # (launch, arch) pairs, set before the worker processes fork


def _compile_one(i: int) -> dict:
    from mhc_kernels.aot import compile_launch

    launch, arch = _JOBS[i]
    return compile_launch(launch, arch, use_cache=_USE_CACHE)


_USE_CACHE = True


def run_gate(launches, use_cache=True, jobs=1):
    """Compile each (launch, arch), in `jobs` forked worker processes (compiles are independent and CPU-bound);
    returns the list of reports in the order of `launches`."""
    global _JOBS, _USE_CACHE
    entries = list(launches.values())
    _JOBS, _USE_CACHE = [(launch, arch) for launch, arch, _ in entries], use_cache
    if jobs > 1:
        import multiprocessing as mp

        # biggest kernels first (the matmuls take longest) so the workers finish together
        order = sorted(range(len(_JOBS)), key=lambda i: "projection" not in _JOBS[i][0].name)
        with mp.get_context("fork").Pool(jobs) as pool:
            done = dict(zip(order, pool.map(_compile_one, order, chunksize=1)))
        reports = [done[i] for i in range(len(_JOBS))]
    else:
        reports = [_compile_one(i) for i in range(len(_JOBS))]
    for rep, (_, _, cases) in zip(reports, entries):
        rep["cases"] = sorted(set(cases))
    return reports


def print_table(reports):
    print(
        f"{'kernel':28s} {'arch':6s} {'constexprs':42s} {'warps':>5s} {'stg':>3s} {'regs':>4s} {'spill':>5s} "
        f"{'smem':>7s} {'occ':>5s}  status"
    )
    for r in sorted(reports, key=lambda r: (r["kernel"], r["arch"], str(r["constexprs"]))):
        const = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(
            f"{r['kernel']:28s} {r['arch']:6s} {const[:42]:42s} {r['num_warps']:5d} {r['num_stages']:3d} "
            f"{r.get('registers') or 0:4d} {r.get('spill_bytes', 0):5d} {r.get('shared_bytes', 0):7d} "
            f"{r.get('occupancy', 0):5.2f}  {'ok' if r['ok'] else 'FAIL: ' + r['why']}"
        )


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    p.add_argument("--C", type=int, nargs="*", default=[4096, 1280, 192, 67])
    p.add_argument("--dtype", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--arch", type=int, nargs="*", default=[90, 100])
    p.add_argument(
        "--arms", nargs="*", default=None, help="only these arms (mhc mhc_identity hc sinkhorn mhc_single_pass)"
    )
    p.add_argument("--no-cache", action="store_true", help="recompile everything (ignore ~/.cache/mhc_aot)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: one per core)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "check_kernels.json")
    args = p.parse_args(argv)
    t0 = time.time()
    cases = [c for c in matrix(args.n, args.C, args.dtype) if args.arms is None or c["arm"] in args.arms]
    launches = unique_launches(cases, args.arch)
    reports = run_gate(launches, use_cache=not args.no_cache, jobs=args.jobs)
    print_table(reports)
    failed = [r for r in reports if not r["ok"]]
    import triton

    summary = {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "specializations": len(reports),
        "passed": len(reports) - len(failed),
        "failed": len(failed),
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(_cpu_seconds(), 1),  # this process and its workers / ptxas: the wall time on 1 idle core
        "jobs": args.jobs,
    }
    print(
        f"\n{summary['passed']} of {len(reports)} specializations fit (sm_{'/sm_'.join(map(str, args.arch))}); "
        f"{len(failed)} fail; {summary['seconds']} s wall, {summary['cpu_seconds']} s CPU, {args.jobs} jobs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "reports": reports}, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
