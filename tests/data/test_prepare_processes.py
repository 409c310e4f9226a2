"""Preparation across processes (issue 14): a killed build continues from its last complete shard and ends equal to
an uninterrupted one; a second `prepare` on the same output waits on the lock and reuses; a 2-rank `train` launched
on unprepared data waits on the lock, then prepares once and trains; ranks that see different data stop the job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhc_train.config import DataConfig
from mhc_train.data import TokenData, prepare
from mhc_train.data.lock import PrepareLock
from mhc_train.train.metrics import read_metrics
from tests.support import launch
from tests.support.configs import run_overrides
from tests.support.corpora import make_documents, write_jsonl
from tests.support.logs import collect_progress

pytestmark = pytest.mark.slow  # every test runs child processes (prepare, torchrun)

# A `prepare` in a child process, slowed down (a sleep before each batch is written, small batches) so that a test
# can catch it in the middle of a build. Argument: the DataConfig's fields as JSON.
SLOW_PREPARE = """
import importlib, json, sys, time
from mhc_train.config import DataConfig
from mhc_train.data.shards import ShardWriter
from mhc_train.io.log import setup_logging

setup_logging(0)  # progress records to stdout, as the CLI prints them
prep = importlib.import_module("mhc_train.data.build")
prep.BATCH_CHARS = 1500
write = ShardWriter.write
def slow_write(self, *a):
    time.sleep(0.05)
    return write(self, *a)
ShardWriter.write = slow_write
m = prep.prepare(DataConfig(**json.loads(sys.argv[1])))
print("DIR", m["dir"], flush=True)
"""


def _slow_prepare(fields: dict, stdout) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SLOW_PREPARE, json.dumps(fields)]
    env = {**launch.env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=launch.REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
    proc.args_log = stdout.name  # for _wait_for's message
    return proc


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    t0 = time.monotonic()
    while not (value := predicate()):
        if proc.poll() is not None:
            log = Path(proc.args_log).read_text()[-3000:] if hasattr(proc, "args_log") else ""
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}:\n{log}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def _progress(out: Path) -> dict | None:
    """The resume record of the build in `out`, or None."""
    for build in out.glob(".build-*"):
        try:
            return json.loads((build / "progress.json").read_text())
        except (OSError, ValueError):
            return None
    return None


def _train_shards_done(out: Path) -> int:
    return len(p["splits"]["train"]["shards"]) if (p := _progress(out)) else 0


def _written_past_the_record(out: Path, shards: int) -> bool:
    """At least `shards` complete train shards recorded, and the partial train shard on disk already longer than the
    record says (uint16 tokens): a kill now leaves tokens that the resumed build must cut off."""
    if (p := _progress(out)) is None or (n := len(p["splits"]["train"]["shards"])) < shards:
        return False
    partial = next(out.glob(".build-*"), out) / f"train_{n:05d}.bin.partial"
    return partial.is_file() and partial.stat().st_size > 2 * p["splits"]["train"]["partial_tokens"]


def _shard_bytes(data_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(data_dir).glob("*.bin"))}


@pytest.fixture
def corpus(tmp_path, prepared_data) -> dict:
    """A jsonl corpus of ~17 train shards of 1024 tokens, with the session's 512-piece tokenizer."""
    src = write_jsonl(tmp_path / "corpus.jsonl", make_documents(500, seed=7))
    return {"source": str(src), "tokenizer_model": str(prepared_data / "tokenizer.model"), "shard_tokens": 1024}


def test_a_killed_build_continues_from_its_last_complete_shard(tmp_path, corpus):
    # shards of 12 KB and batches of ~1 KB: the file buffer (8 KB) reaches the disk between two resume records
    src = write_jsonl(tmp_path / "big.jsonl", make_documents(1000, seed=8))
    corpus = {**corpus, "source": str(src), "shard_tokens": 6144}
    out = tmp_path / "out"
    with open(tmp_path / "child.log", "w") as log:
        child = _slow_prepare({**corpus, "out_dir": str(out)}, log)
        try:
            _wait_for(lambda: _written_past_the_record(out, 2), child, "tokens written past a record")
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    (build,) = out.glob(".build-*")
    assert any(p.name.endswith(".partial") for p in build.iterdir()) and not list(out.glob("[!.]*"))

    with collect_progress() as log:
        resumed = prepare(DataConfig(**corpus, out_dir=str(out)))
    lines = log.messages
    done = resumed["build"]["resumed_at_document"]
    assert 0 < done < resumed["splits"]["train"]["documents"], done
    assert any(f"continuing the build in {build} after {done:,} documents" in line for line in lines), lines
    assert not build.exists()

    whole = prepare(DataConfig(**corpus, out_dir=str(tmp_path / "whole")))
    assert whole["build"]["resumed_at_document"] == 0
    assert resumed["key"] == whole["key"] and resumed["splits"] == whole["splits"]
    assert _shard_bytes(resumed["dir"]) == _shard_bytes(whole["dir"])
    TokenData(resumed["dir"], verify="digest")


def test_a_second_prepare_waits_on_the_lock_then_reuses(tmp_path, corpus):
    out = tmp_path / "out"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with open(logs[0], "w") as f1, open(logs[1], "w") as f2:
        first = _slow_prepare({**corpus, "out_dir": str(out)}, f1)
        try:
            _wait_for(lambda: _train_shards_done(out) >= 1, first, "the first process to be building")
            first.send_signal(signal.SIGSTOP)  # mid-build, holding the lock, until the second is seen waiting
            try:
                overrides = [f"data.{k}={v}" for k, v in {**corpus, "out_dir": out}.items()]
                second = subprocess.Popen(
                    [sys.executable, "-m", "mhc_train.cli", "prepare", *overrides],
                    cwd=launch.REPO, env={**launch.env(), "PYTHONUNBUFFERED": "1"}, stdout=f2, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
                second.args_log = str(logs[1])
                _wait_for(lambda: f"waiting for PID {first.pid}" in logs[1].read_text(), second, "the second to wait")
            finally:
                first.send_signal(signal.SIGCONT)
            assert second.wait(timeout=240) == 0, logs[1].read_text()
            assert first.wait(timeout=60) == 0, logs[0].read_text()
        finally:
            for p in (first, locals().get("second")):
                if p is not None and p.poll() is None:
                    p.kill()
    one, two = logs[0].read_text(), logs[1].read_text()
    assert f"prepare: waiting for PID {first.pid} on " in two and "train shard(s) complete" in two, two
    assert "prepare: wrote" in one and "prepare: wrote" not in two and "tokenising" not in two
    built = one.split("DIR ")[1].strip()
    assert f"prepared data: {built} " in two and "reusing it" in two
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [Path(built).name]


def _ranks_logging(log_path: Path, start: str) -> set[int]:
    """The ranks with a line starting with `start` (rank 0 logs as it is, rank 1's lines start with "rank 1: ")."""
    lines = log_path.read_text().splitlines()
    return {1 if ln.startswith("rank 1: ") else 0 for ln in lines if ln.removeprefix("rank 1: ").startswith(start)}


def test_two_rank_train_on_unprepared_data_waits_on_the_lock_then_trains(tmp_path, corpus):
    out, run = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    overrides = run_overrides(
        out, run, **{f"data.{k}": v for k, v in corpus.items()}, **{"train.max_steps": 2, "parallel.engine": "ddp"}
    )
    log_path = tmp_path / "torchrun.log"
    # this test holds the lock, as a `prepare` on another node of the same filesystem would
    with PrepareLock(out / ".prepare.lock"), open(log_path, "w") as log:
        proc = subprocess.Popen(
            launch.torchrun_cmd(overrides),
            cwd=launch.REPO,
            env={**launch.env(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            waiting = f"prepare: waiting for PID {os.getpid()} on "  # the test is the holder they name
            _wait_for(lambda: _ranks_logging(log_path, waiting) == {0, 1}, proc, "both ranks to wait", timeout=180)
            assert not list(out.glob(".build-*"))
        except BaseException:
            proc.kill()
            raise
    try:
        assert proc.wait(timeout=240) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    # one rank built (either: the other waited and then reused it), and logged it, whichever it was
    assert len(_ranks_logging(log_path, "prepare: tokenising ")) == 1, text[-4000:]
    assert _ranks_logging(log_path, "prepare: wrote ") == _ranks_logging(log_path, "prepare: tokenising ")
    assert text.count("prepare: wrote ") == 1
    assert not list(out.glob(".build-*"))
    (prepared,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert [r["step"] for r in read_metrics(run)["train"]] == [1, 2]
    assert prepared.name in text


def test_ranks_with_different_data_stop_the_job(tmp_path, prepared_data):
    for rank in (0, 1):  # "two nodes" without a shared filesystem, given different text
        write_jsonl(tmp_path / f"src{rank}" / "c.jsonl", make_documents(300, seed=rank))
    per_rank = {
        "data.source": f"{tmp_path}/src${{oc.env:RANK}}",
        "data.tokenizer_model": prepared_data / "tokenizer.model",
    }
    overrides = run_overrides(
        f"{tmp_path}/out${{oc.env:RANK}}", tmp_path / "run", **per_rank, **{"parallel.engine": "ddp"}
    )
    proc = subprocess.run(
        launch.torchrun_cmd(overrides), cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=240
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "rank(s) [1] prepared other data than rank 0" in text and "run `mhc-train prepare` once on each" in text
    assert (tmp_path / "out0").is_dir() and (tmp_path / "out1").is_dir()
    assert not (tmp_path / "run").exists()  # stopped before the run directory was claimed
