"""One torch DCP checkpoint written in parts, so that an import never holds more than one part in memory.

`dcp.save` writes a whole state dict at once: its data files and a `.metadata` that indexes them. `StreamingDcp`
saves each part (one source shard's tensors) as its own small DCP checkpoint in a hidden sub-directory, moves the
part's data files up under names of their own (`__0_<part>_<n>.distcp`: rank 0's, as `Format.writer_of` reads
them), and merges the parts' metadata (tensor metadata, planner data, storage locations with the new file names)
into one `.metadata`, written last. The result is an ordinary DCP directory: `dcp.load` into any layout and
`dcp_to_torch_save` read it. The state dict is nested ({"model": {...}, "optim": {...}}), as `Engine.live_state`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path


class StreamingDcp:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parts = 0
        self.merged = None

    def add(self, state: dict) -> None:
        """Write one part (a nested state dict of CPU tensors) and merge its index."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        sub = self.dir / f".part{self.parts}"
        dcp.save(state, checkpoint_id=str(sub), no_dist=True)
        meta = FileSystemReader(str(sub)).read_metadata()
        renamed = {}
        for f in sorted(sub.glob("*.distcp")):
            name = f"__0_{self.parts}_{f.name.removeprefix('__0_')}"
            os.replace(f, self.dir / name)
            renamed[f.name] = name
        storage = {
            k: dataclasses.replace(v, relative_path=renamed[v.relative_path]) for k, v in meta.storage_data.items()
        }
        shutil.rmtree(sub)
        if self.merged is None:
            self.merged = dataclasses.replace(meta, state_dict_metadata={}, planner_data={}, storage_data={})
        self.merged.state_dict_metadata.update(meta.state_dict_metadata)
        self.merged.planner_data.update(meta.planner_data or {})
        self.merged.storage_data.update(storage)
        self.parts += 1

    def close(self) -> None:
        """Write the merged `.metadata` (last: a directory without it is incomplete)."""
        tmp = self.dir / ".metadata.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.merged, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / ".metadata")
