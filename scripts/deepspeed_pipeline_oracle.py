"""Train a config on DeepSpeed's own pipeline engine (PipelineModule, 1F1B): the independent oracle for our
torch.distributed.pipelining runs. Same YAML and overrides as `mhc-train train`; launch parallel.pp ranks:

    .venv/bin/python -m torch.distributed.run --nproc_per_node=2 scripts/deepspeed_pipeline_oracle.py \
        model=test train=test parallel.pp=2 train.max_steps=3 --out runs/oracle.json

Prints each step's loss and pre-clip gradient norm; rank 0 writes {"losses": [...], "grad_norms": [...]} to --out. Compare with the `train` records of
`metrics.jsonl` from the same overrides under `mhc-train train` (tests/parallel/test_distributed.py does).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where tools/ lives

from mhc_train.cli import shutdown_distributed  # noqa: E402
from mhc_train.config import load_config  # noqa: E402
from tools.deepspeed_pipeline import train_losses  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = None
    if "--out" in args:
        i = args.index("--out")
        out, args = Path(args[i + 1]), args[:i] + args[i + 2 :]
    cfg = load_config(args)
    import torch.distributed as dist

    losses, norms = train_losses(cfg, cfg.train.max_steps)
    if out is not None and dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"losses": losses, "grad_norms": norms}, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main()
