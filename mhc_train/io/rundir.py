"""The run directory: every path a run writes or reads, in one place (`RunDir`).

<run_dir>/
  config.yaml                     the resolved config of the latest launch
  metrics.jsonl                   one JSON record per line (meta, train, val, diag), appended
  summary.json                    the final summary (written by `mhc-train train`)
  grads_step_<N>.pt               debug: reduced, pre-clip gradients of step N (train.dump_grads_at)
  checkpoints/
    step_XXXXXXXX.pt              one complete checkpoint (written as a hidden temp file, then renamed)
    damaged/, superseded/         checkpoints moved aside on resume (kept, never deleted)
    dcp/step_XXXXXXXX/            its torch DCP shards (checkpoint format dcp)
    deepspeed/step_XXXXXXXX/      its DeepSpeed shards (parallel.engine=deepspeed)
  locks/rank<N>.lock              each rank's lock on the directory (`mhc_train.io.lock`), with its holder record
  tokenizer.model                 the run's copy of the tokenizer it trained with
"""

from __future__ import annotations

import re
from pathlib import Path

STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- records -----------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def grads(self, step: int) -> Path:
        return self.root / f"grads_step_{step}.pt"

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @staticmethod
    def tag(step: int) -> str:
        """The name of step `step`'s checkpoint: its file stem and its sharded directories' name."""
        return f"step_{step:08d}"

    def step_file(self, step: int) -> Path:
        return self.checkpoints / f"{self.tag(step)}.pt"

    def temp_file(self, step: int, owner: int) -> Path:
        """Where `step_file(step)` is written before the rename (hidden, never listed as a checkpoint)."""
        return self.checkpoints / f".{self.tag(step)}.pt.tmp{owner}"

    def temp_files(self) -> list[Path]:
        return sorted(self.checkpoints.glob(".step_*.tmp*")) if self.checkpoints.is_dir() else []

    @property
    def damaged(self) -> Path:
        return self.checkpoints / "damaged"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.model"

    def lock(self, rank: int) -> Path:
        return self.root / "locks" / f"rank{rank}.lock"

    @property
    def dcp_root(self) -> Path:
        return self.checkpoints / "dcp"

    def dcp_dir(self, tag: str) -> Path:
        return self.dcp_root / tag

    @property
    def deepspeed_root(self) -> Path:
        return self.checkpoints / "deepspeed"

    def sharded_dirs(self, tag: str) -> list[Path]:
        """Every sharded directory a step file of this tag may point at."""
        return [self.dcp_root / tag, self.deepspeed_root / tag]

    def step_files(self) -> list[tuple[int, Path]]:
        """Complete step files, oldest first (temporaries are never listed)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := STEP_FILE.match(p.name))]
        return sorted(found)

    @staticmethod
    def of_step_file(path: str | Path) -> RunDir:
        """The run directory a step file lives in (`<run_dir>/checkpoints/step_*.pt`)."""
        return RunDir(Path(path).resolve().parent.parent)
