"""Memory-mapped token shards and deterministic batches.

The global batch of (step, micro) is a pure function of (seed, step, micro): a resumed run draws exactly the batches
the uninterrupted run would have, without replaying anything, and data-parallel rank r of W takes rows
[r B/W, (r+1) B/W) of the same global batch, so any world size sees the same data. Shards are `np.memmap`ed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mhc_train.config import DataConfig
from mhc_train.data.errors import DataError
from mhc_train.data.prepare import find_prepared, load_manifest, verify_shards


class TokenData:
    """The shards of one prepared directory: the `dir` of the manifest `prepare` returns (or an older flat
    `data.out_dir` that holds a manifest itself)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        verify_shards(self.dir, self.manifest)
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {
            name: np.memmap(self.dir / info["file"], dtype=dtype, mode="r")
            for name, info in self.manifest["splits"].items()
        }

    @classmethod
    def for_config(cls, cfg: DataConfig, log=lambda *a: None) -> TokenData:
        """The data already prepared for `cfg` (nothing is built: DataError when `mhc-train prepare` has not run)."""
        return cls(find_prepared(cfg, log=log)["dir"])

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def check_compatible(self, model_vocab: int, seq_len: int) -> None:
        if model_vocab != self.vocab_size:
            raise DataError(
                f"model.vocab_size={model_vocab} but the tokenizer in {self.dir} has {self.vocab_size} pieces; set "
                f"model.vocab_size={self.vocab_size} (or prepare the data with data.vocab_size={model_vocab})"
            )
        for name, arr in self.splits.items():
            if len(arr) < seq_len + 1:
                raise DataError(
                    f"train.seq_len={seq_len} needs at least {seq_len + 1} tokens but the {name} split has {len(arr)}; "
                    "lower train.seq_len or add data"
                )

    def train_batch(
        self, seed: int, step: int, micro: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
    ):
        """Rank `rank`'s rows of the global batch [batch_size, seq_len] of (seed, step, micro): random windows."""
        arr = self.splits["train"]
        rng = np.random.default_rng([seed, step, micro])
        starts = rng.integers(0, len(arr) - seq_len, size=batch_size)
        per = batch_size // world
        return self._windows(arr, starts[rank * per : (rank + 1) * per], seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """The fixed held-out slice: n_batches * batch_size windows evenly spaced over the val split."""
        arr = self.splits["val"]
        starts = np.linspace(0, len(arr) - seq_len - 1, n_batches * batch_size).astype(np.int64)
        return [self._windows(arr, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(n_batches)]

    @staticmethod
    def _windows(arr, starts, seq_len):
        block = torch.from_numpy(np.stack([arr[s : s + seq_len + 1].astype(np.int64) for s in starts]))
        return block[:, :-1], block[:, 1:]

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's unigram distribution: the loss of a model that ignores context."""
        counts = np.bincount(np.asarray(self.splits[split]), minlength=self.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())
