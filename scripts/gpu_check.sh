#!/usr/bin/env bash
# One command for a GPU session (the device machine has its own torch/triton and no registry):
#   bash scripts/gpu_check.sh [OUT_DIR]
# Compiles and tests the Triton kernels for real (tests/kernels without the interpreter), then runs the kernel
# and Sinkhorn-backward benchmarks on the GPU and writes their JSON (with device and versions) to OUT_DIR
# (default benchmarks/results). Needs only torch, triton, numpy and pytest (no hydra, datasets or deepspeed);
# hyper-connections is optional (the peer in bench_kernels). Untested so far: no GPU session has run it yet.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python - <<'PY' > "$OUT/gpu_env.json"
import json, torch, triton
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "cuda": torch.version.cuda}, indent=2))
PY
# the package is not installed on the device: map the import name mhc_kernels onto kernels/
python -c "import sys, os; p = os.path.join(os.getcwd(), 'mhc_kernels'); os.path.exists(p) or os.symlink('kernels', p)"
python -m pytest -q tests/kernels tests/ops -p no:cacheprovider 2>&1 | tee "$OUT/gpu_kernel_tests.txt" | tail -5
python scripts/bench_kernels.py --out "$OUT/bench_kernels_cuda.json" 2>&1 | tail -20
python scripts/bench_sinkhorn_backward.py --tokens 65536 2>&1 | tail -8
# DualPipeV's overlapped F/B on one GPU (needs hydra-core and omegaconf for the config; skipped without them)
if python -c "import hydra, omegaconf" 2>/dev/null; then
  python scripts/bench_overlap.py --model 125m --seq 2048 --micro-batch 2 --microbatches 8 --steps 10 \
      --out "$OUT/bench_overlap_cuda.json" 2>&1 | tail -5
else
  echo "bench_overlap skipped: hydra-core/omegaconf not installed on this machine"
fi
rm -f mhc_kernels
