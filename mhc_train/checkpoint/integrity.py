"""Integrity of checkpoint bytes: the digest footer of a step file and the digests of sharded directories.

Every step file ends with a footer: MAGIC, the digest of the bytes before the footer, and their length. torch.load
reads the zip in front of it and ignores the footer; `verify_file` checks it. Sharded state (DCP, DeepSpeed) is
covered by the step file itself: it lists the digest and size of every file in the directories it points at. At
save time each rank digests the files it wrote itself (`CheckpointManager.save`); only the digests travel to rank 0.

The digest is a tree: the CRC-32 of each CHUNK-byte piece, hashed together with sha256. Any change to a piece is
caught with probability 1 - 2^-32, the pieces are checked in parallel threads (zlib and os.pread release the GIL),
and the whole check runs at several GB/s (scripts/bench_checkpoint.py). It detects corruption (disk, network,
a partial copy); like any digest stored beside the data without a key, it is no defence against deliberate edits.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mhc_train.checkpoint.errors import CheckpointError, UnverifiableCheckpoint

MAGIC = b"MHCCRC1\0"
FOOTER = len(MAGIC) + 32 + 8
CHUNK = 16 << 20


def digest(path: Path, limit: int | None = None) -> str:
    """The tree digest of the first `limit` bytes of `path` (all of it by default)."""
    size = path.stat().st_size if limit is None else limit
    fd = os.open(path, os.O_RDONLY)
    try:

        def piece(offset: int) -> bytes:
            return zlib.crc32(os.pread(fd, min(CHUNK, size - offset), offset)).to_bytes(4, "little")

        offsets = range(0, size, CHUNK)
        if len(offsets) <= 1:
            leaves = [piece(o) for o in offsets]
        else:
            with ThreadPoolExecutor(min(len(offsets), os.cpu_count() or 1, 8)) as pool:
                leaves = list(pool.map(piece, offsets))
    finally:
        os.close(fd)
    return hashlib.sha256(size.to_bytes(8, "little") + b"".join(leaves)).hexdigest()


def append_footer(path: Path) -> None:
    """Append the digest footer of `path`'s current bytes, fsynced."""
    size = path.stat().st_size
    value = bytes.fromhex(digest(path))
    with open(path, "ab") as f:
        f.write(MAGIC + value + size.to_bytes(8, "little"))
        f.flush()
        os.fsync(f.fileno())


def verify_file(path: Path) -> int:
    """Check a step file's footer digest; returns the bytes verified. Raises CheckpointError naming the problem."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - FOOTER))
        footer = f.read(FOOTER)
    if size < FOOTER or footer[: len(MAGIC)] != MAGIC:
        raise UnverifiableCheckpoint(
            f"checkpoint {path} has no integrity footer: it was written before checkpoints carried digests, or it is "
            "truncated. It was not loaded or moved; to load it unverified set checkpoint.verify=false"
        )
    want, length = footer[len(MAGIC) : len(MAGIC) + 32].hex(), int.from_bytes(footer[-8:], "little")
    if length != size - FOOTER:
        raise CheckpointError(f"checkpoint {path} is damaged: its footer records {length} bytes, the file holds {size}")
    if digest(path, length) != want:
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the digest written with it")
    return size


def files_under(directory: Path) -> list[str]:
    """The paths, relative to `directory` and sorted, of every file under it (a listing: no file is read)."""
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file())


def digest_files(directory: Path, names) -> dict:
    """{name: [size, sha256]} of the files `names` (relative to `directory`)."""
    return {rel: [(directory / rel).stat().st_size, digest(directory / rel)] for rel in names}


def shard_digests(directory: Path) -> dict:
    """{path relative to `directory`: [size, sha256]} of every file under it."""
    return digest_files(directory, files_under(directory))


def verify_shards(directory: Path, digests: dict) -> int:
    """Check every file a step file lists under `directory`; returns the bytes verified."""
    total = 0
    for rel, (size, want) in digests.items():
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard {f} is missing")
        if f.stat().st_size != size or digest(f) != want:
            raise CheckpointError(f"checkpoint shard {f} is damaged: it does not match the digest its step file lists")
        total += size
    return total
