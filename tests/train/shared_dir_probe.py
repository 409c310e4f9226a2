"""Run under torchrun by tests/train/test_shared_dir.py: every rank checks the run directory SHARED_PROBE_DIR (with
`{rank}` filled in, a node-local directory is simulated: each rank its own) and prints `rank N: ok` or
`rank N: refused: <message>`, exiting 0 either way."""

import os
from pathlib import Path

from mhc_train.parallel import init_distributed, shutdown
from mhc_train.train.errors import TrainingError
from mhc_train.train.shared_dir import check_shared_run_dir

info = init_distributed("cpu")
root = Path(os.environ["SHARED_PROBE_DIR"].format(rank=info.rank))
root.mkdir(parents=True, exist_ok=True)
try:
    check_shared_run_dir(root, info, patience_s=0.5)
    print(f"rank {info.rank}: ok", flush=True)
except TrainingError as e:
    print(f"rank {info.rank}: refused: {e}", flush=True)
shutdown()
