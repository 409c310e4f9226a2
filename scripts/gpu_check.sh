#!/usr/bin/env bash
# One command for a lent GPU (H100 / H200; the device machine has its own torch and Triton and no registry):
#   bash scripts/gpu_check.sh [OUT_DIR]      # OUT_DIR: default $OUT (the device tool's folder), else benchmarks/results
# Writes everything into ONE file, OUT_DIR/gpu_check.json:
#   env                       device, torch, triton, CUDA, cuDNN, capability, memory, driver, dense bf16 peak TFLOPS
#   kernel_tests              tests/kernels + tests/ops compiled for real (no interpreter): pass/fail/skip counts and
#                             the failing test ids
#   bench_kernels             scripts/bench_kernels.py's JSON (full mHC site vs torch / torch.compile, per kernel GB/s)
#   bench_sinkhorn_backward   scripts/bench_sinkhorn_backward.py's JSON (unrolled vs implicit, at 65536 tokens)
#   bench_document_attention  scripts/bench_document_attention.py's JSON: per-document attention, SDPA mask vs
#                             flex_attention (data.document_mask_kernel) vs plain causal, fwd+bwd ms, flex-vs-sdpa diffs
#   bench_overlap             scripts/bench_overlap.py's JSON, with MFU per variant (only where hydra-core and
#                             omegaconf are installed; otherwise the reason it was skipped)
#   bench_moe                 scripts/bench_moe.py's JSON (--no-ep): the MoE layer at the 3B paper model's shapes and
#                             grouped-GEMM tokens/s (torch._grouped_mm vs the per-expert loop, bf16, Table 5's expert
#                             shapes), with device and versions; also copied to OUT_DIR/bench_moe_cuda.json
#   serve_vllm                scripts/check_vllm_serving.py's JSON: an export served by vLLM's Transformers backend,
#                             its greedy tokens against mhc-train generate's ("skipped" where vLLM is not installed)
#   steps                     per step: rc, seconds, time limit and the tail of its output
# Needs only torch, triton, numpy and pytest (no hydra, datasets or deepspeed): the package is not installed, so
# PYTHONPATH is the repository (mhc_train and mhc_kernels import from it). Each step runs
# under its own time limit, capped by what is left of a total budget, GPU_CHECK_BUDGET_S (default 440 s: the whole
# script ends within 8 minutes); a step that fails or times out does not stop the others. Exit status 0 when every
# step passed, 1 otherwise. Without CUDA (torch.cuda.is_available() false) it says so, writes a JSON with
# "status": "skipped", "reason": "no CUDA device" and exits 0; GPU_CHECK_ALLOW_CPU=1 runs every step on the CPU
# anyway (a dry run of this script; the timings mean nothing). PYTHON picks the interpreter (default python).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO="$PWD"
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
JSON="$OUT_DIR/gpu_check.json"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET # kernels compile for real (tests/conftest.py sets it again only where there is no GPU)
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-440}))
WORK="$(mktemp -d)"
cleanup() {
  rm -rf "$WORK"
}
trap cleanup EXIT

# run_step NAME CAP_S CMD...: CMD under min(CAP_S, time left) seconds; output in $WORK/NAME.log, "rc seconds limit"
# in $WORK/NAME.rc. Never exits the script.
run_step() {
  local name=$1 cap=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  limit=$((limit < 0 ? 0 : limit))
  if [ "$limit" -lt 10 ]; then
    echo "skipped: the total budget GPU_CHECK_BUDGET_S is spent" >"$WORK/$name.log"
    echo "budget 0 $limit" >"$WORK/$name.rc"
    echo "== $name: skipped (out of time budget)"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "$rc $(($(date +%s) - t0)) $limit" >"$WORK/$name.rc"
  tail -n 12 "$WORK/$name.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $name: TIMED OUT after ${limit}s"
  else
    echo "== $name: rc=$rc"
  fi
  return 0
}

# merge [skipped|failed REASON]: every result under $WORK into $JSON (stdlib only; MFU needs mhc_train, tried, optional)
merge() {
  "$PY" - "$WORK" "$JSON" "$START" "$@" <<'PY'
import json, os, re, sys, time
import xml.etree.ElementTree as ET

work, out, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
mode, reason = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, None)  # skipped|failed REASON


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"no JSON ({type(e).__name__}: {e})"}


def tail(name, n=40):
    try:
        with open(os.path.join(work, name + ".log"), errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


steps = {}
for fname in sorted(os.listdir(work)):
    if fname.endswith(".rc"):
        name = fname[:-3]
        rc, seconds, limit = open(os.path.join(work, fname)).read().split()
        status = {"0": "ok", "budget": "skipped_budget", "124": "timed_out", "137": "timed_out"}.get(rc, "failed")
        steps[name] = {"status": status, "rc": None if rc == "budget" else int(rc), "seconds": int(seconds),
                       "limit_s": int(limit), "log_tail": tail(name)}

report = {"script": "scripts/gpu_check.sh", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "env": load(os.path.join(work, "env.json"))}
if mode:
    report.update(status=mode, reason=reason, steps=steps, seconds=int(time.time()) - start)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    sys.exit(0 if mode == "skipped" else 1)

# kernel tests: counts from pytest's junit XML, else from its summary line
tests = {}
try:
    root = ET.parse(os.path.join(work, "junit.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = sum(int(s.get(key, 0)) for s in suites)
    tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
    tests["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[:1]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    tests["failed_tests"] = failed[:30]
except (OSError, ET.ParseError) as e:
    summary = " ".join(tail("kernel_tests", 5))
    for word in ("passed", "failed", "errors", "skipped"):
        m = re.search(rf"(\d+) {word[:-1] if word == 'errors' else word}", summary)
        tests[word] = int(m.group(1)) if m else 0
    tests["note"] = f"no junit XML ({type(e).__name__}); counts from the summary line"
    if not any(tests[k] for k in ("passed", "failed", "errors", "skipped")):  # cut short: count the progress line
        progress = "".join(re.sub(r"\s*\[\s*\d+%\]$", "", line) for line in tail("kernel_tests", 10**6)
                           if re.fullmatch(r"[.FEsxX]+(\s*\[\s*\d+%\])?", line.strip()))
        tests.update(passed=progress.count("."), failed=progress.count("F"), errors=progress.count("E"),
                     skipped=progress.count("s"), note=tests["note"] + "; cut short: from the progress line")
report["kernel_tests"] = tests

kernels = os.path.join(work, "bench_kernels.json")
report["bench_kernels"] = load(kernels if os.path.exists(kernels) else os.path.join(work, "bench_kernels_nc.json"))
sink = os.path.join(work, "sinkhorn", "benchmarks", "results")
found = sorted(os.listdir(sink)) if os.path.isdir(sink) else []
report["bench_sinkhorn_backward"] = load(os.path.join(sink, found[0])) if found else {"error": "no JSON written"}

overlap_skip = os.path.join(work, "bench_overlap.skipped")
if os.path.exists(overlap_skip):
    report["bench_overlap"] = {"skipped": open(overlap_skip).read().strip()}
else:
    ov = report["bench_overlap"] = load(os.path.join(work, "bench_overlap.json"))
    try:  # MFU per variant: the model's training FLOPs per token x tokens/s on this one device / its peak
        import dataclasses

        import yaml

        from mhc_train.config import ConnectionConfig, ModelConfig
        from mhc_train.train.throughput import device_peak_tflops, flops_per_token, mfu

        def preset(group, name, schema):
            with open(os.path.join("configs", group, name + ".yaml")) as f:
                data = yaml.safe_load(f) or {}
            return schema(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(schema)}})

        m = dataclasses.replace(preset("model", ov["model"], ModelConfig), n_layer=ov["n_layer"])
        flops = flops_per_token(m, preset("connection", ov["connection"], ConnectionConfig), ov["seq"])
        peak = device_peak_tflops(ov.get("device", ""))
        ov["flops_per_token"], ov["peak_tflops"] = flops, peak
        for r in ov.get("results", []):
            r["mfu"] = mfu(r["tokens_per_s"], flops["total"], peak)
    except Exception as e:  # noqa: BLE001 - MFU is extra; the benchmark's own numbers stay
        if isinstance(ov, dict) and "error" not in ov:
            ov["mfu_error"] = f"{type(e).__name__}: {e}"

report["bench_document_attention"] = load(os.path.join(work, "bench_document_attention.json"))
report["bench_moe"] = load(os.path.join(work, "bench_moe.json"))
report["serve_vllm"] = load(os.path.join(work, "serve_vllm.json"))

report["steps"] = steps
bad = [n for n, s in steps.items() if s["status"] != "ok"]
if (tests.get("failures") or tests.get("errors")) and "kernel_tests" not in bad:
    bad.append("kernel_tests")
report.update(status="ok" if not bad else "failed", failed_steps=bad, seconds=int(time.time()) - start)
with open(out, "w") as f:
    json.dump(report, f, indent=1)
print(f"gpu_check: {report['status']}"
      + (f" (failed: {', '.join(bad)})" if bad else "")
      + f"; kernel tests {tests.get('passed', 0)} passed, {tests.get('failures', tests.get('failed', 0))} failed,"
      + f" {tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped; {report['seconds']} s")
sys.exit(0 if not bad else 1)
PY
}

# 1. environment (also decides whether there is anything to check)
run_step env 60 "$PY" - "$WORK/env.json" <<'PY'
import json, platform, subprocess, sys

env = {"python": platform.python_version(), "host": platform.node()}
try:
    import torch

    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device"] = "cpu"
except Exception as e:  # noqa: BLE001
    env["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import triton

    env["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    env["triton_error"] = f"{type(e).__name__}: {e}"
try:
    from mhc_train.train.throughput import device_peak_tflops

    env["peak_bf16_tflops"] = device_peak_tflops(env.get("device", ""))
except Exception as e:  # noqa: BLE001
    env["peak_error"] = f"{type(e).__name__}: {e}"
try:
    q = "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm"
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True,
                                       timeout=20).stdout.strip().splitlines()
except Exception:  # noqa: BLE001 - no nvidia-smi on this machine
    pass
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
sys.exit(0 if "torch_error" not in env else 1)
PY

CUDA=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('cuda_available', 'unknown'))" \
  "$WORK/env.json" 2>/dev/null || echo unknown)
if [ "$CUDA" = "unknown" ]; then
  echo "gpu_check: torch could not be imported (see env in $JSON)"
  merge failed "torch could not be imported"
  exit 1
fi
if [ "$CUDA" != "True" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  echo "gpu_check: no CUDA device (torch.cuda.is_available() is false): nothing to check here; run it on a GPU" \
    "machine (or GPU_CHECK_ALLOW_CPU=1 for a dry run). Wrote $JSON"
  merge skipped "no CUDA device"
  exit 0
fi

# the GPU sizes; a CPU dry run takes the benchmarks' small CPU defaults (the test model for bench_overlap)
SINKHORN_TOKENS=65536
DOCATTN_ARGS=""
OVERLAP_ARGS="--model 125m --seq 2048 --micro-batch 2 --microbatches 8 --steps 10"
MOE_ARGS="--tokens 16384 --dim 1280 --hidden 896 --experts 64 --top-k 6 --reps 5"
MOE_JSON="bench_moe_cuda.json"
if [ "$CUDA" != "True" ]; then
  SINKHORN_TOKENS=2048
  DOCATTN_ARGS="--cases 256x2 --doc-lens 32 --heads 4 --kv-heads 2 --head-dim 16 --iters 3 --warmup 1"
  OVERLAP_ARGS=""
  MOE_ARGS="--reps 1 --grouped-tokens 256"
  MOE_JSON="bench_moe_cpu_dry_run.json"
fi

# 2. the kernels and their references, compiled for real
run_step kernel_tests 150 "$PY" -m pytest -q tests/kernels tests/ops -p no:cacheprovider --junitxml="$WORK/junit.xml"
# 3. full mHC site and per-kernel bandwidth (torch.compile included; retried without it if that ran out of time)
run_step bench_kernels 180 "$PY" scripts/bench_kernels.py --out "$WORK/bench_kernels.json"
if [ ! -s "$WORK/bench_kernels.json" ]; then
  run_step bench_kernels_nc 90 "$PY" scripts/bench_kernels.py --no-compile --out "$WORK/bench_kernels_nc.json"
fi
# 4. Sinkhorn backward (it writes benchmarks/results/ under its working directory: a scratch one here)
mkdir -p "$WORK/sinkhorn"
(cd "$WORK/sinkhorn" && run_step bench_sinkhorn_backward 60 "$PY" "$REPO/scripts/bench_sinkhorn_backward.py" \
  --tokens "$SINKHORN_TOKENS")
# 5. per-document attention: SDPA with the boolean mask vs flex_attention (its compile included in the first calls)
# shellcheck disable=SC2086  # DOCATTN_ARGS is a list of words
run_step bench_document_attention 90 "$PY" scripts/bench_document_attention.py $DOCATTN_ARGS \
  --out "$WORK/bench_document_attention.json"
# 6. DualPipeV's overlapped F/B on one GPU (its config needs hydra-core and omegaconf)
if "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  # shellcheck disable=SC2086  # OVERLAP_ARGS is a list of words
  run_step bench_overlap 90 "$PY" scripts/bench_overlap.py $OVERLAP_ARGS --out "$WORK/bench_overlap.json"
else
  echo "hydra-core/omegaconf not installed on this machine" >"$WORK/bench_overlap.skipped"
  echo "== bench_overlap: skipped (hydra-core/omegaconf not installed)"
fi

# 6b. the MoE layer and grouped-GEMM tokens/s (grouped_mm vs the per-expert loop; EP's gloo step is CPU-only: --no-ep)
# shellcheck disable=SC2086  # MOE_ARGS is a list of words
run_step bench_moe 90 "$PY" scripts/bench_moe.py $MOE_ARGS --no-ep --out "$WORK/bench_moe.json"
if [ -s "$WORK/bench_moe.json" ]; then cp "$WORK/bench_moe.json" "$OUT_DIR/$MOE_JSON"; fi

# 7. an export served by vLLM's Transformers backend (skipped, with a note, where vLLM is not installed)
run_step serve_vllm 120 "$PY" scripts/check_vllm_serving.py --out "$WORK/serve_vllm.json"

merge
rc=$?
echo "wrote $JSON"
exit $rc
