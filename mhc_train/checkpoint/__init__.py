"""Checkpoints, for training and inference alike (rank 6: above `parallel`, below `train` and `infer`).

- `integrity.py`: the digest footer of a step file and the digests of sharded directories;
- `formats.py`: one class per format (file, dcp, deepspeed), each with save / load / verify / weights;
- `stepfile.py`: a step file written atomically and read back verified (`read_model_state` for inference);
- `manager.py`: `CheckpointManager`, the checkpoints of one run directory (saving, retention, moving aside);
- `background.py`: asynchronous DCP saves (`checkpoint.async_save`): staging, the write and the commit off the loop;
- `shared_verify.py`: resume-time shard verification shared by every rank (each its share, failures reduced);
- `resume.py`: choosing the resume point and checking it against the run;
- `compat.py`: the configuration compatibility rule (a key added later at its default is unchanged, a removed key is
  dropped with a notice, a change of the model is fatal);
- `rng.py`: every RNG's state; `errors.py`: `CheckpointError` and its kinds.
"""

from mhc_train.checkpoint.compat import compare_configs, drop_removed
from mhc_train.checkpoint.errors import CheckpointError, CorruptCheckpoint, UnverifiableCheckpoint
from mhc_train.checkpoint.manager import CheckpointManager
from mhc_train.checkpoint.stepfile import load_step_file, read_model_state

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpoint",
    "UnverifiableCheckpoint",
    "compare_configs",
    "drop_removed",
    "load_step_file",
    "read_model_state",
]
