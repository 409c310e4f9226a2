"""The compile gate (kernels/aot.py) reports a kernel that cannot fit an H100: it must be able to fail.

Runs in a subprocess: the gate compiles real kernels, so triton must be imported without TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, torch
from mhc_kernels import projection
from mhc_kernels.aot import compile_launch
from mhc_kernels.utils import capture
projection.BLOCK_D = %d  # the block config under test
x = torch.empty(64, 16, 4096, device="meta", dtype=torch.bfloat16)
phi = torch.empty(16 * 4096, 288, device="meta")
with capture() as launches:
    projection.mhc_projection(x, phi)
print(json.dumps(compile_launch(launches[0], 90, use_cache=False)))
"""


def _gate(block_d: int) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    out = subprocess.run([sys.executable, "-c", SCRIPT % block_d], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gate_reports_an_oversized_block_config_as_failing():
    report = _gate(512)  # a [512, 512] fp32 phi tile per stage: far over 227 KB of shared memory
    print(report)
    assert not report["ok"] and ("shared memory" in report["why"] or "compile error" in report["why"]), report
