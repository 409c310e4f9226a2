"""Resume-time verification split among the ranks (`checkpoint.shared_verify.share`): every file exactly once, the
same split on every rank, balanced by size; and a damaged file in one rank's share fails with one line naming it."""

from __future__ import annotations

from mhc_train.checkpoint.integrity import shard_digests
from mhc_train.checkpoint.shared_verify import _verify_mine, share


def test_share_covers_every_file_once_balanced():
    files = {f"__{i % 3}_{i}.distcp": [1000 + 37 * i, "x"] for i in range(11)} | {".metadata": [50, "y"]}
    for world in (1, 2, 3, 4):
        parts = [share(files, world, r) for r in range(world)]
        names = [n for p in parts for n in p]
        assert sorted(names) == sorted(files)  # each file in exactly one rank's share
        loads = [sum(e[0] for e in p.values()) for p in parts]
        assert max(loads) - min(loads) <= max(e[0] for e in files.values()), loads


def test_a_damaged_file_in_a_share_is_one_line_naming_it(tmp_path):
    for i in range(4):
        (tmp_path / f"__{i}_0.distcp").write_bytes(bytes([i]) * (100 + i))
    files = shard_digests(tmp_path)
    victim = next(iter(share(files, 2, 1)))
    (tmp_path / victim).write_bytes(b"\0" * files[victim][0])
    assert _verify_mine(tmp_path, files, 2, 0)[1] is None  # rank 0's share is intact
    nbytes, failure = _verify_mine(tmp_path, files, 2, 1)
    assert nbytes == 0 and f"{victim} is damaged" in failure and "\n" not in failure


def test_an_unreadable_file_is_a_reported_failure_not_an_escaping_error(tmp_path, monkeypatch):
    """An OSError while reading a share (EIO, ESTALE on a network filesystem) must come back as this rank's failure:
    escaping, it would skip the gather every other rank waits in (a hang until the process-group timeout)."""
    import mhc_train.checkpoint.shared_verify as sv

    (tmp_path / "__0_0.distcp").write_bytes(b"x" * 10)
    files = shard_digests(tmp_path)

    def unreadable(directory, files):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sv, "verify_shards", unreadable)
    nbytes, failure = _verify_mine(tmp_path, files, 1, 0)
    assert nbytes == 0 and "cannot read a shard" in failure and "Input/output error" in failure and "\n" not in failure
