"""The one lock primitive (`mhc_train.io.lock.FileLock`): exclusive, named holder, freed by a dead holder, and the
O_EXCL marker where flock does not work."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys

import pytest

from mhc_train.io import lock as lock_mod
from mhc_train.io.lock import FileLock


def test_a_second_holder_is_refused_and_named(tmp_path):
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.try_acquire()
    a.record(build="dir1")
    assert not b.try_acquire()
    assert b.holder()["pid"] == os.getpid() and b.holder()["build"] == "dir1"
    a.release()
    assert b.try_acquire() and b.held
    b.release()


def test_a_dropped_lock_object_frees_its_lock(tmp_path):
    a = FileLock(tmp_path / "x.lock")
    assert a.try_acquire()
    del a
    b = FileLock(tmp_path / "x.lock")
    assert b.try_acquire()
    b.release()


@pytest.fixture
def no_flock(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", refuse)


def test_without_flock_an_o_excl_marker_locks(tmp_path, no_flock):
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.try_acquire() and a.marker.is_file()
    assert not b.try_acquire()
    assert b.holder()["pid"] == os.getpid()
    a.release()
    assert not a.marker.exists()
    assert b.try_acquire()
    b.release()


def test_without_flock_a_dead_holders_marker_is_taken_over(tmp_path, no_flock):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    a = FileLock(tmp_path / "x.lock")
    a.marker.write_text(f'{{"pid": {pid}, "host": "{lock_mod.socket.gethostname()}", "since": "then"}}')
    assert a.try_acquire()
    assert a.holder()["pid"] == os.getpid()
    a.release()


def test_flock_is_used_where_it_works(tmp_path):
    a = FileLock(tmp_path / "x.lock")
    assert a.try_acquire() and not a.marker.exists()
    fd = os.open(tmp_path / "x.lock", os.O_RDWR)
    with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
    a.release()
