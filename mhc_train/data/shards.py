"""Numbered token shards: the deterministic train/val split by document, the writer, and their verification.

A split is the concatenation of its shards `<split>_00000.bin`, `<split>_00001.bin`, ... (flat uint16 or uint32 token
ids, documents joined by EOS, each shard `data.shard_tokens` long but the last). The manifest lists, per split, each
shard's file, token count and sha256.

- The split is by whole document and streams: documents are taken in windows of W (100, or 1/val_fraction when that
  is larger), and in each window a seeded draw picks round(val_fraction * len) of them (at least one) for val. A
  document is in exactly one split, so nothing leaks, and the choice depends only on (seed, position), never on the
  worker count.
- A shard is written as `<name>.partial` and renamed when full, so a complete-named file is always complete; the
  writer's `state()` is what a resumed build needs to continue from the last complete shard (see prepare).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mhc_train.data.errors import DataError

PARTIAL = ".partial"
_HINT = "re-run `mhc-train prepare` (same data.* settings) to rebuild it, or delete that prepared directory"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


# ---- the split ---------------------------------------------------------------------------------------------------
def split_window(val_fraction: float) -> int:
    return max(100, math.ceil(1 / val_fraction))


def val_positions(seed: int, window: int, length: int, val_fraction: float) -> set[int]:
    """Which of the `length` documents of window number `window` go to val."""
    k = min(length - 1, max(1, round(val_fraction * length))) if length > 1 else 0
    rng = np.random.default_rng([seed, window, length])
    return set(rng.choice(length, size=k, replace=False).tolist())


def split_documents(docs: Iterable[str], val_fraction: float, seed: int) -> Iterator[tuple[int, str, str]]:
    """(position, split, text) for every non-blank document, in order. A corpus of one document is cut into blocks of
    200 lines first, so there is something to hold out. Buffers one window of documents."""
    size = split_window(val_fraction)
    buf: list[str] = []
    window = position = 0
    only_one = True
    for doc in docs:
        if not doc.strip():
            continue
        buf.append(doc)
        if len(buf) == size:
            only_one = False
            yield from _emit(buf, window, position, val_fraction, seed)
            position += len(buf)
            window, buf = window + 1, []
    if only_one and len(buf) == 1:
        lines = buf[0].splitlines(keepends=True)
        buf = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
        if len(buf) < 2:
            raise DataError("the input is a single document under 200 lines: too little text to hold out a val split")
    if not buf and position == 0:
        raise DataError("the input text is empty: every document is blank")
    yield from _emit(buf, window, position, val_fraction, seed)


def _emit(buf: list[str], window: int, position: int, val_fraction: float, seed: int):
    val = val_positions(seed, window, len(buf), val_fraction)
    for i, doc in enumerate(buf):
        yield position + i, ("val" if i in val else "train"), doc


# ---- writing -----------------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends a split's tokens to numbered shards of `shard_tokens` tokens in `directory`.

    Args:
        resume: a `state()` recorded by an earlier, killed build: its complete shards are kept, the partial shard is
            cut back to the recorded length (it may hold tokens written after the record) and re-hashed.
    """

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int, resume: dict | None = None):
        self.dir, self.split, self.dtype, self.shard_tokens = Path(directory), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._hash, self._filled, self._f = hashlib.sha256(), 0, None
        if resume is not None:
            self._resume(resume)
        self._open()

    def _path(self, index: int, partial: bool = True) -> Path:
        return self.dir / (shard_name(self.split, index) + (PARTIAL if partial else ""))

    def _open(self) -> None:
        self._f = open(self._path(len(self.shards)), "ab" if self._filled else "wb")

    def _resume(self, state: dict) -> None:
        self.shards, self.documents = [dict(s) for s in state["shards"]], state["documents"]
        for s in self.shards:
            if (self.dir / s["file"]).stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise DataError(f"shard {self.dir / s['file']} does not match the build's record")
        index, keep = len(self.shards), state["partial_tokens"] * self.dtype.itemsize
        partial, renamed = self._path(index), self._path(index, partial=False)
        if not partial.exists() and renamed.exists():  # renamed when full, killed before the record was written
            os.replace(renamed, partial)
        if keep and (not partial.exists() or partial.stat().st_size < keep):
            raise DataError(f"{partial} is shorter than the build's record")
        with open(partial, "ab") as f:
            f.truncate(keep)
        with open(partial, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                self._hash.update(chunk)
        self._filled = state["partial_tokens"]
        for p in self.dir.glob(f"{self.split}_*.bin*"):  # shards written after the record: rewritten identically
            if p.name not in {s["file"] for s in self.shards} and p != partial:
                p.unlink()

    def write(self, tokens: np.ndarray, documents: int) -> bool:
        """Append `tokens` (the EOS-terminated ids of `documents` whole documents); True when a shard completed."""
        self.documents += documents
        completed, tokens = False, tokens.astype(self.dtype, copy=False)
        while tokens.size:
            room = self.shard_tokens - self._filled
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._f.write(data)
            self._hash.update(data)
            self._filled += part.size
            if self._filled == self.shard_tokens:
                self._close_shard()
                self._open()
                completed = True
        return completed

    def _close_shard(self) -> None:
        index = len(self.shards)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._path(index), self._path(index, partial=False))
        self.shards.append(
            {"file": shard_name(self.split, index), "tokens": self._filled, "sha256": self._hash.hexdigest()}
        )
        self._hash, self._filled = hashlib.sha256(), 0

    def flush(self) -> None:
        """Make the partial shard durable (before a resume record names its length)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def state(self) -> dict:
        return {"shards": [dict(s) for s in self.shards], "partial_tokens": self._filled, "documents": self.documents}

    def finish(self) -> dict:
        """Close the last shard (removed when empty); the split's manifest entry."""
        if self._filled:
            self._close_shard()
        else:
            self._f.close()
            self._path(len(self.shards)).unlink()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": self.documents,
            "shards": self.shards,
        }


# ---- reading -----------------------------------------------------------------------------------------------------
def split_shards(info: dict) -> list[dict]:
    """A split's shards: the manifest's list, or the single file of a manifest from before numbered shards."""
    return info["shards"] if "shards" in info else [{"file": info["file"], "tokens": info["tokens"], **info}]


def verify_shards(data_dir: str | Path, manifest: dict, digests: bool = False) -> None:
    """Each shard exists and holds exactly the manifest's token count (a size check, no reading); with `digests`,
    also its sha256. A DataError names the first bad shard."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        for shard in split_shards(info):
            path = Path(data_dir) / shard["file"]
            if not path.is_file():
                raise DataError(f"{split} shard {path} is missing; {_HINT}")
            expected, actual = shard["tokens"] * itemsize, path.stat().st_size
            if actual != expected:
                raise DataError(
                    f"{split} shard {path} has {actual} bytes but the manifest says {shard['tokens']} tokens "
                    f"({expected} bytes): it is truncated or from another prepare run; {_HINT}"
                )
            if digests and shard.get("sha256"):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 24), b""):
                        h.update(chunk)
                if h.hexdigest() != shard["sha256"]:
                    raise DataError(
                        f"{split} shard {path} is corrupt: its sha256 is {h.hexdigest()[:16]}... but the manifest "
                        f"says {shard['sha256'][:16]}...; delete the prepared directory {Path(data_dir)} and re-run "
                        "`mhc-train prepare` (same data.* settings) to rebuild it (prepare checks sizes, not digests, "
                        "so it would reuse the directory as it is)"
                    )
