"""Ahead-of-time compilation of recorded kernel launches for NVIDIA targets, with no GPU and no driver.

`compile_launch(launch, arch)` binds the recorded arguments the way Triton's launcher does (same specialization:
dtypes, 16-byte alignment, integer divisibility by 16), compiles with `triton.compile(..., target=GPUTarget("cuda",
arch, 32))` and Triton's bundled ptxas, and reports what decides whether the kernel runs well on that chip:
- registers per thread and spill bytes (from `ptxas -v` on the generated PTX),
- shared memory per program (Triton's allocation) against the chip's per-block limit,
- occupancy: resident warps per SM out of 64, limited by registers, shared memory and the 32-block cap.
A compile error, shared memory over the limit or any spill makes the report fail (`report["ok"] is False`).

Needs a real `triton.jit` kernel: import triton without TRITON_INTERPRET=1 (scripts/check_kernels.py sees to it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

# Per-SM limits (CUDA occupancy tables; the same for H100 sm_90 and B200 sm_100).
LIMITS = {
    90: {"chip": "H100", "smem_per_block": 227 * 1024, "regs_per_sm": 65536, "max_warps": 64, "max_blocks": 32},
    100: {"chip": "B200", "smem_per_block": 227 * 1024, "regs_per_sm": 65536, "max_warps": 64, "max_blocks": 32},
}
CACHE = Path(os.environ.get("MHC_AOT_CACHE", Path.home() / ".cache" / "mhc_aot"))


def _bind(launch, backend):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would compute them for these arguments."""
    from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(**launch.args)
    sigvals = [s[0] for s in specialization]
    signature = {p.name: v for p, v in zip(fn.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound.values()), path) for path in constexprs}
    attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    options = backend.parse_options(dict(launch.options))
    return signature, constexprs, attrs, options


def specialization_key(launch, arch: int) -> str:
    """A stable id of what the compiler sees: kernel source, signature, constants, attributes, options, target, and
    the Triton release and the ptxas it runs (they decide registers and spills; the kernel's own cache_key hashes
    only the source, so without them a report cached under one Triton would pass the gate under another)."""
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    signature, constexprs, attrs, options = _bind(launch, backend)
    text = json.dumps(
        [
            triton.__version__,
            backend.hash(),  # "<ptxas --version>-<arch>": also changes with TRITON_PTXAS_PATH
            launch.kernel.cache_key,
            signature,
            sorted(map(str, constexprs.items())),
            str(attrs),
            launch.options,
            arch,
        ],
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _parse_usage(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if not regs:
        return None
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)),
        "spill_bytes": (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0),
    }


@contextlib.contextmanager
def _triton_ptxas_log(into: io.StringIO):
    """Triton runs ptxas with -v when it builds the cubin; its log is printed when knobs.nvidia.dump_ptxas_log is on.
    Capturing it saves a second ptxas run per kernel (where the knob is missing, _ptxas_usage runs ptxas itself).
    Triton's own cache is bypassed (knobs.compilation.always_compile): a hit there runs no ptxas, and the fallback's
    flags are not every release's (Triton 3.9 adds --regAllocOptLevel=2, 3.6 does not), so the numbers would no
    longer be the ones the installed Triton builds. The gate keeps its own cache (CACHE) instead."""
    all_knobs = getattr(triton, "knobs", None)
    knobs = getattr(all_knobs, "nvidia", None)
    if knobs is None or not hasattr(knobs, "dump_ptxas_log"):
        yield
        return
    compilation = getattr(all_knobs, "compilation", None)
    always = hasattr(compilation, "always_compile")
    previous = knobs.dump_ptxas_log, always and compilation.always_compile
    knobs.dump_ptxas_log = True
    if always:
        compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(into):
            yield
    finally:
        knobs.dump_ptxas_log = previous[0]
        if always:
            compilation.always_compile = previous[1]


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spills from `ptxas -v` (the bundled ptxas, the same flags Triton uses)."""
    from triton.backends.nvidia import compiler as nv

    try:
        ptxas = nv.get_ptxas(arch).path
    except TypeError:  # older Triton: get_ptxas() takes no arch
        ptxas = nv.get_ptxas().path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    return _parse_usage(out.stdout + out.stderr) or {"registers": None, "spill_bytes": 0}


def _occupancy(regs: int, smem: int, num_warps: int, arch: int) -> float:
    lim = LIMITS[arch]
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256  # allocation granularity: 256 registers per warp
    blocks = min(
        lim["max_blocks"],
        lim["max_warps"] // num_warps,
        lim["regs_per_sm"] // (regs_per_warp * num_warps),
        (228 * 1024) // (smem + 1024) if smem else lim["max_blocks"],  # 1 KB per block reserved by the driver
    )
    return blocks * num_warps / lim["max_warps"]


def compile_launch(launch, arch: int, use_cache: bool = True) -> dict:
    """Compile one recorded launch for sm_<arch>; returns a JSON-able report with `ok` and, if not ok, `why`."""
    from triton.compiler import ASTSource, make_backend

    key = specialization_key(launch, arch)
    cached = CACHE / f"{key}.json"
    if use_cache and cached.exists():
        return json.loads(cached.read_text())
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _bind(launch, make_backend(target))
    report = {"kernel": launch.name, "arch": f"sm_{arch}", "key": key, "triton": triton.__version__, **launch.options}
    report["constexprs"] = {launch.kernel.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
    log = io.StringIO()
    try:
        with _triton_ptxas_log(log):
            compiled = triton.compile(
                ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as exc:  # noqa: BLE001 - any compiler failure fails the gate, with its message
        report.update(ok=False, why=f"compile error: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        return report
    smem = int(compiled.metadata.shared)
    usage = _parse_usage(log.getvalue()) or _ptxas_usage(compiled.asm["ptx"], arch)
    report.update(usage, shared_bytes=smem)
    limit = LIMITS[arch]["smem_per_block"]
    why = []
    if smem > limit:
        why.append(f"shared memory {smem} B > {limit} B")
    if usage["spill_bytes"]:
        why.append(f"spills {usage['spill_bytes']} B")
    if usage["registers"] is None:
        why.append("ptxas reported no register count")
    report["occupancy"] = round(_occupancy(usage["registers"] or 255, smem, launch.options["num_warps"], arch), 3)
    report.update(ok=not why, why="; ".join(why))
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(report))
    return report
