"""The multi-node launch: the torchrun command `mhc_train.parallel.launch` renders (every flag, for 2 nodes x 8 GPUs),
and the sbatch template that runs it (parses, sets the NCCL / allocator / thread environment with a reason each, and,
run under stub `scontrol` / `srun`, hands srun exactly the rendered command)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_train.config import ConfigError
from mhc_train.parallel.launch import main, torchrun_command
from tests.support.launch import REPO

SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"
OVERRIDES = ["model=7b", "parallel=fsdp", "run_dir=/shared/runs/a b"]
ENVIRONMENT = {  # what the template must export (a Megatron / torchtitan user expects each)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": None,  # a per-job path
    "NCCL_DEBUG": "WARN",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "OMP_NUM_THREADS": None,  # cores per rank
}


def test_the_command_for_2_nodes_of_8_gpus_has_every_flag():
    cmd = torchrun_command(2, 8, "node001", "4242", OVERRIDES)
    assert cmd == [
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node001:29500",
        "--rdzv_id=4242",
        "--max_restarts=0",
        "-m",
        "mhc_train.train",
        *OVERRIDES,
    ]


def test_main_prints_the_command_shell_quoted(capsys):
    argv = ["--nodes", "2", "--gpus-per-node", "8", "--head", "node001", "--job-id", "4242", "--port", "29611"]
    assert main([*argv, "--", *OVERRIDES]) == 0
    printed = shlex.split(capsys.readouterr().out)  # the overrides come back intact, the space included
    assert printed == torchrun_command(2, 8, "node001", "4242", OVERRIDES, port=29611)


@pytest.mark.parametrize("nodes,gpus,head,job", [(0, 8, "h", "1"), (2, 0, "h", "1"), (2, 8, "", "1"), (2, 8, "h", "")])
def test_an_impossible_launch_is_refused(nodes, gpus, head, job):
    with pytest.raises(ConfigError):
        torchrun_command(nodes, gpus, head, job)


def _exports(text: str) -> dict[str, tuple[str, bool]]:
    """NAME -> (value, whether a comment says why: on the line, or just above it past the lines that compute the
    value)."""
    lines, found = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = re.match(r"export (\w+)=(\S*)", line)
        if m:
            j = i - 1
            while j >= 0 and re.match(r"(\w+=|mkdir |CORES=)", lines[j]):  # helper lines between reason and export
                j -= 1
            reason = " # " in line or (j >= 0 and lines[j].startswith("#"))
            found[m.group(1)] = (m.group(2).strip('"'), reason)
    return found


def test_the_sbatch_template_parses_and_sets_the_environment_with_reasons():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    exports = _exports(SBATCH.read_text())
    for name, value in ENVIRONMENT.items():
        assert name in exports, f"{SBATCH.name} does not export {name}"
        assert value is None or exports[name][0] == value, (name, exports[name])
        assert exports[name][1], f"{name} has no comment saying why"
    text = SBATCH.read_text()
    assert "python -m mhc_train.parallel.launch" in text and "srun" in text
    assert '--job-id "$SLURM_JOB_ID"' in text and '--nodes "$SLURM_NNODES"' in text


@pytest.mark.slow  # one Python start that imports torch (~5 s on 2 cores)
def test_the_sbatch_template_runs_the_rendered_command(tmp_path):
    """The template under stub `scontrol` (two nodes) and `srun` (records its argv and environment): srun gets one
    task per node running exactly the command the renderer gives for this job."""
    bin_dir, record = tmp_path / "bin", tmp_path / "srun"
    bin_dir.mkdir()
    stubs = {
        # The second host comes late: a reader that stops after the first line (head -n 1) has closed the pipe by
        # then, and under pipefail scontrol's SIGPIPE would end the job (status 141, as on CI once).
        "scontrol": "printf 'node001\\n'; sleep 0.3; printf 'node002\\n'",
        "srun": f'printf "%s\\n" "$@" > {record}.argv; env > {record}.env',
        "python": f'exec {shlex.quote(sys.executable)} "$@"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(REPO),
        SLURM_JOB_NODELIST="node[001-002]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="8",
        SLURM_CPUS_ON_NODE="96",
        SLURM_SUBMIT_DIR=str(tmp_path),
    )
    out = subprocess.run(
        ["bash", str(SBATCH), *OVERRIDES], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    argv = Path(f"{record}.argv").read_text().splitlines()
    assert argv[:4] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none", "bash"], argv
    assert argv[4] == "-c" and shlex.split(argv[5]) == torchrun_command(2, 8, "node001", "4242", OVERRIDES)
    seen = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    assert seen["OMP_NUM_THREADS"] == "12"  # 96 cores over 8 ranks
    assert seen["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/flight_recorder/4242/rank_"
    for name, value in ENVIRONMENT.items():
        assert value is None or seen[name] == value, name
