"""Resume-time verification shared by every rank: the shards a step file lists are split among the ranks (balanced
by size, the same split on every rank), each rank digests its share against the step file's digests, and the outcomes
are reduced, so a damaged file on any rank fails the resume everywhere with one line naming it. Rank 0 no longer
reads back every shard while the others wait.

Rank 0 drives (it chooses the resume point: `resume.choose`, with `ShardCheck.verify` as its shard check); the other
ranks `follow` it: they receive each candidate's listing, verify their share and report, until rank 0 says it chose.
"""

from __future__ import annotations

from pathlib import Path

from mhc_train.checkpoint.errors import CheckpointError
from mhc_train.checkpoint.integrity import verify_shards
from mhc_train.parallel import DistInfo, broadcast_from_main
from mhc_train.parallel.dist import gather_dicts


def share(files: dict, world: int, rank: int) -> dict:
    """This rank's part of `files` ({name: [size, digest]}): the largest first, each to the least-loaded rank."""
    load, mine = [0] * world, {}
    for name, entry in sorted(files.items(), key=lambda kv: (-kv[1][0], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += entry[0]
        if r == rank:
            mine[name] = entry
    return mine


def _verify_mine(directory: Path, files: dict, world: int, rank: int) -> tuple[int, str | None]:
    """(bytes verified, the failure's message or None) of this rank's share."""
    try:
        return verify_shards(directory, share(files, world, rank)), None
    except CheckpointError as e:
        return 0, str(e)
    except OSError as e:  # an unreadable file (EIO, ESTALE, removed mid-read): a failure to report, never a rank
        return 0, f"{directory}: cannot read a shard ({type(e).__name__}: {e})"[:300]  # that skips the gather


class ShardCheck:
    """Rank 0's side: `verify(directory, files)` has every rank verify its share (a collective with `follow`);
    returns the bytes rank 0 verified, raises CheckpointError with the first failure of any rank; `done()` releases
    the followers."""

    def __init__(self, info: DistInfo):
        self.info, self.world = info, info.world

    def verify(self, directory: Path, files: dict) -> int:
        if self.world == 1:
            return verify_shards(directory, files)
        broadcast_from_main(("verify", str(directory), files), self.info)
        nbytes, failure = _verify_mine(directory, files, self.world, 0)
        failures = [f for _, f in sorted(gather_dicts({0: failure}, self.info).items()) if f]
        if failures:
            raise CheckpointError(failures[0])
        return nbytes

    def done(self) -> None:
        if self.world > 1:
            broadcast_from_main(("done", None, None), self.info)


def follow(info: DistInfo) -> None:
    """Ranks other than 0: verify each candidate's share rank 0 announces, until it is done choosing."""
    while True:
        what, directory, files = broadcast_from_main(None, info)
        if what == "done":
            return
        _, failure = _verify_mine(Path(directory), files, info.world, info.rank)
        gather_dicts({info.rank: failure}, info)
