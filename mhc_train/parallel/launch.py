"""The multi-node launch line: the `torchrun` command every node of a job runs, built here so that it is tested
(`scripts/slurm/train.sbatch` renders it with `python -m mhc_train.parallel.launch ... -- <overrides>`).

Notable choices:
- c10d rendezvous on the head node (`--rdzv_backend=c10d --rdzv_endpoint=<head>:<port>`): no etcd, no MASTER_ADDR or
  NODE_RANK bookkeeping; torchrun numbers the nodes as they join.
- `--rdzv_id` is the scheduler's job id: two jobs that land on the same head node never join each other's group, and
  a requeued job (same id) forms its group afresh.
- `--nnodes=N` is a fixed count, not an elastic `min:max` range: the world size is part of a run's layout (the batch
  split, the pipeline x data-parallel mesh), which `mhc_train.config.validate_world` checks at start.
- `--max_restarts=0`: a rank that dies ends the job; relaunching the same command resumes from the last checkpoint
  (`checkpoint.resume=auto`), which also covers a lost node, where an in-place restart would not.
- The training entry is `-m mhc_train.train` with the user's Hydra overrides passed through untouched; `main` prints
  the command shell-quoted, so `bash -c "$(...)"` runs exactly these arguments.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from mhc_train.config import ConfigError

RDZV_PORT = 29500  # torchrun's default master port: the rendezvous store listens there on the head node
MODULE = "mhc_train.train"


def torchrun_command(
    nodes: int,
    gpus_per_node: int,
    head: str,
    job_id: str,
    overrides: Sequence[str] = (),
    port: int = RDZV_PORT,
    torchrun: str = "torchrun",
) -> list[str]:
    """The argv each node runs: `torchrun` with a c10d rendezvous on `head:port` for `nodes` x `gpus_per_node`
    processes, rendezvous id `job_id`, running `-m mhc_train.train <overrides>`."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"a launch needs at least one node and one GPU per node, not {nodes} x {gpus_per_node}")
    if not head or not str(job_id):
        raise ConfigError("a multi-node launch needs the head node's address and the job id (the rendezvous id)")
    return [
        torchrun,
        f"--nnodes={nodes}",
        f"--nproc_per_node={gpus_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={head}:{port}",
        f"--rdzv_id={job_id}",
        "--max_restarts=0",
        "-m",
        MODULE,
        *overrides,
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mhc_train.parallel.launch",
        description="Print the torchrun command of a multi-node launch (shell-quoted); Hydra overrides after `--`.",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--head", required=True, help="the head node's host name or address (the rendezvous endpoint)")
    p.add_argument("--job-id", required=True, help="the rendezvous id: the scheduler's job id")
    p.add_argument("--port", type=int, default=RDZV_PORT)
    p.add_argument("--torchrun", default="torchrun", help="the torchrun executable")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for mhc_train.train (after `--`)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        cmd = torchrun_command(a.nodes, a.gpus_per_node, a.head, a.job_id, a.overrides, a.port, a.torchrun)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
