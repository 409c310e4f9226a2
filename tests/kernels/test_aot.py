"""The compile gate (kernels/aot.py) reports a kernel that cannot fit an H100: it must be able to fail.

Runs in a subprocess: the gate compiles real kernels, so triton must be imported without TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a subprocess (real compilation, no interpreter)

SCRIPT = r"""
import json, torch
from mhc_kernels import projection
from mhc_kernels.aot import compile_launch
from mhc_kernels.utils import capture
config = %r  # the block config under test, in place of the shipped one (None: the shipped one)
if config:
    projection._fwd_configs = lambda *shape: [config]
x = torch.empty(512, 4, 1024, device="meta", dtype=torch.bfloat16)
phi = torch.empty(4 * 1024, 24, device="meta")
with capture() as launches:
    projection.mhc_projection(x, phi)
print(json.dumps(compile_launch(launches[0], 90, use_cache=False)))
"""


def _gate(config: dict | None) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    out = subprocess.run([sys.executable, "-c", SCRIPT % (config,)], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gate_reports_an_oversized_block_config_as_failing():
    # 4 pipeline stages of a [512, 64] fp32 phi tile: 128 KB each, far over the 227 KB limit
    report = _gate(dict(BLOCK_T=16, BLOCK_C=512, BLOCK_K=64, num_warps=4, num_stages=4))
    print(report)
    assert not report["ok"], report
    assert "shared memory" in report["why"] or "compile error" in report["why"], report


def test_gate_passes_the_shipped_projection_config():
    report = _gate(None)  # the shipped config: the control (the failure above is the block size, not the gate)
    assert report["ok"], report
    assert report["spill_bytes"] == 0 and report["registers"] <= 255, report
