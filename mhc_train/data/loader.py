"""Memory-mapped token shards and deterministic batches.

- The global batch of (step, micro) is a pure function of (seed, step, micro): a resumed run draws exactly the batches
  the uninterrupted run would have, without replaying anything, and data-parallel rank r of W takes rows
  [r B/W, (r+1) B/W) of the same global batch, so any world size sees the same data.
- A split is the concatenation of its shards (each `np.memmap`ed, nothing read up front); a window may cross a shard
  boundary. Windows are packed: they start anywhere and run across document boundaries, the EOS token between
  documents telling the model where one ends (with data.document_mask the model attends within each document:
  mhc_train/model/documents.py). A weighted blend of several prepared sources is data/blend.py.
- `Prefetcher` draws the next batches on a background thread while the model computes, pinning them on CUDA so the
  host-to-device copy can overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mhc_train.config import DataConfig
from mhc_train.data.errors import DataError
from mhc_train.data.shards import split_shards, verify_shards
from mhc_train.data.stats import unigram_entropy
from mhc_train.data.store import find_prepared, load_manifest


class ShardedSplit:
    """One split's shards as one flat token array: `len()` and `read(start, length)`."""

    def __init__(self, data_dir: Path, info: dict, dtype):
        shards = split_shards(info)
        self.files = [data_dir / s["file"] for s in shards]
        self.arrays = [np.memmap(f, dtype=dtype, mode="r") for f in self.files if f.stat().st_size]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])  # offsets[i]: first token of shard i

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, pos, end = [], start, start + length
        while pos < end:
            lo = pos - self.offsets[i]
            take = min(end, self.offsets[i + 1]) - pos
            pieces.append(self.arrays[i][lo : lo + take])
            pos += take
            i += 1
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return out.astype(np.int64)

    def all_tokens(self):
        """Every token, shard by shard (for statistics)."""
        yield from self.arrays


class TokenData:
    """The shards of one prepared directory: the `dir` of the manifest `prepare` returns (or an older flat
    `data.out_dir` that holds a manifest itself).

    Args:
        verify: "size" checks each shard's length against the manifest (no reading), "digest" also its sha256.
    """

    def __init__(self, data_dir: str | Path, verify: str = "size"):
        self.dir = Path(data_dir)
        self.manifest = load_manifest(self.dir)
        verify_shards(self.dir, self.manifest, digests=verify == "digest")
        dtype = np.dtype(self.manifest["dtype"])
        self.splits = {name: ShardedSplit(self.dir, info, dtype) for name, info in self.manifest["splits"].items()}

    @classmethod
    def for_config(cls, cfg: DataConfig) -> TokenData:
        """The data already prepared for `cfg` (nothing is built: DataError when `mhc-train prepare` has not run)."""
        return cls(find_prepared(cfg)["dir"], verify=cfg.verify)

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    def check_compatible(self, model_vocab: int, seq_len: int, unused_rows_ok: bool = False) -> None:
        """`unused_rows_ok` (model.vocab_padded): a model vocabulary larger than the tokenizer's is valid."""
        if model_vocab != self.vocab_size and not (unused_rows_ok and model_vocab > self.vocab_size):
            raise DataError(
                f"model.vocab_size={model_vocab} but the tokenizer in {self.dir} has {self.vocab_size} pieces; set "
                f"model.vocab_size={self.vocab_size} (or prepare the data with data.vocab_size={model_vocab})"
            )
        for name, split in self.splits.items():
            if len(split) < seq_len + 1:
                raise DataError(
                    f"train.seq_len={seq_len} needs at least {seq_len + 1} tokens but the {name} split has "
                    f"{len(split)}; lower train.seq_len or add data"
                )

    def train_batch(
        self, seed: int, step: int, micro: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
    ):
        """Rank `rank`'s rows of the global batch [batch_size, seq_len] of (seed, step, micro): random windows."""
        split = self.splits["train"]
        rng = np.random.default_rng([seed, step, micro])
        starts = rng.integers(0, len(split) - seq_len, size=batch_size)
        per = batch_size // world
        return self._windows(split, starts[rank * per : (rank + 1) * per], seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """The fixed held-out slice: n_batches * batch_size windows evenly spaced over the val split."""
        split = self.splits["val"]
        starts = np.linspace(0, len(split) - seq_len - 1, n_batches * batch_size).astype(np.int64)
        return [self._windows(split, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(n_batches)]

    @staticmethod
    def _windows(split: ShardedSplit, starts, seq_len):
        block = torch.from_numpy(np.stack([split.read(int(s), seq_len + 1) for s in starts]))
        return block[:, :-1], block[:, 1:]

    def unigram_entropy(self, split: str = "val") -> float:
        """Entropy (nats/token) of the split's unigram distribution: the loss of a model that ignores context. Read
        from the manifest (prepare stores it); a manifest written before that has it computed here, reading the split
        (so call it on one rank)."""
        stored = self.manifest["splits"][split].get("unigram_entropy")
        if stored is not None:
            return float(stored)
        return unigram_entropy(self.splits[split].all_tokens(), self.vocab_size)


class Prefetcher:
    """Batches of a pure function `fn(step, micro, *rest)`, drawn ahead on one background thread.

    `get(step, micro, *rest)` returns the batch (from the prefetch when it was predicted, else computed now: a miss
    costs time, never correctness) and starts drawing the next `depth` keys in (step, micro) order with the same
    `rest` (e.g. this rank's slice), micro running to `n_micro`. With `pin` the tensors are pinned, so a later
    `.to(cuda, non_blocking=True)` overlaps compute.
    """

    def __init__(self, fn: Callable, n_micro: int, depth: int = 2, pin: bool = False):
        self.fn, self.n_micro, self.depth, self.pin = fn, n_micro, depth, pin
        self._pool: ThreadPoolExecutor | None = None  # started on first use, again after close()
        self._pending: dict[tuple, Future] = {}
        self._lock = threading.Lock()

    def _draw(self, *key):
        batch = self.fn(*key)
        return tuple(t.pin_memory() for t in batch) if self.pin else batch

    def _next(self, key: tuple) -> tuple:
        step, micro, *rest = key
        return (step, micro + 1, *rest) if micro + 1 < self.n_micro else (step + 1, 0, *rest)

    def get(self, step: int, micro: int, *rest):
        key = (step, micro, *rest)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
            future = self._pending.pop(key, None)
            for stale in [k for k in self._pending if k[:2] < key[:2]]:  # keys passed over (a skipped step)
                self._pending.pop(stale).cancel()
            ahead = key
            for _ in range(self.depth):
                ahead = self._next(ahead)
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._draw, *ahead)
        return future.result() if future is not None else self._draw(*key)

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._pending = self._pool, None, {}
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
