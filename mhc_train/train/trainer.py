"""The training loop: data, an engine (mhc_train.parallel), checkpoints, metrics and diagnostics for one run.

The trainer builds the plain model, loads a checkpoint's weights into it, hands it to `build_engine`, and from then on
drives the `Engine` interface only; it never asks which engine it holds.

Notes:
1. Batches are a function of (seed, step, micro-batch), and the checkpoint carries every RNG state, so a resumed run
   continues bit for bit on CPU (tested).
2. The step counter `step` is the number of completed optimiser steps; metrics are logged at that value.
3. A NaN or inf loss stops the run (naming the step and the last good checkpoint) unless `train.skip_nonfinite`,
   which skips and counts such steps, up to `train.max_skipped_steps`.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mhc_train.checkpoint import CheckpointError, CheckpointManager
from mhc_train.config import Config, to_dict, validate, validate_world
from mhc_train.data import DataError, TokenData, prepare
from mhc_train.data.loader import Prefetcher
from mhc_train.io.rundir import RunDir
from mhc_train.model import build_model
from mhc_train.parallel import (
    any_rank_flag,
    broadcast_from_main,
    build_engine,
    builds_on_meta,
    exchange_without_deadline,
    init_distributed,
    read_scalars,
)
from mhc_train.train.diagnostics import connection_diagnostics, grad_norms
from mhc_train.train.errors import Preempted, TrainingError
from mhc_train.train.lock import claim_run_dir, holds_a_run
from mhc_train.train.metrics import MetricsLogger, read_metrics
from mhc_train.train.preemption import StopSignals
from mhc_train.train.throughput import StepTimer, device_peak_tflops, flops_per_token, mfu

__all__ = ["Preempted", "Trainer", "TrainingError", "train"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


class Trainer:
    def __init__(self, cfg: Config, log=print):
        validate(cfg)
        validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.cfg, self.config_dict = cfg, to_dict(cfg)
        self.dist = init_distributed(t.device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.run_dir = RunDir(cfg.run_dir)

        manifest = self._prepare_data()
        self.data = TokenData(manifest["dir"], verify=cfg.data.verify)  # the directory prepare() made or reused
        self.data.check_compatible(cfg.model.vocab_size, t.seq_len)
        self.tokenizer_ref = {"path": manifest["tokenizer"]["path"], "sha256": manifest["tokenizer"]["sha256"]}
        self.lock = claim_run_dir(self.run_dir, cfg.checkpoint, self.dist, self.log)  # after the data: a data error
        # leaves no run directory behind
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _prepare_data(self) -> dict:
        """Every rank calls `prepare`: on each filesystem the first one builds (or reuses) the data under the prepare
        lock while the others wait on that lock, logging progress; no rank sits in a collective meanwhile (an
        exchange through the store, without deadline, follows). Every rank must end with the same data."""
        rank, dist = self.dist.rank, self.dist

        def log(line: str) -> None:  # other ranks: only waiting and building (the node's builder may be any rank)
            if dist.is_main:
                self.log(line)
            elif line.startswith(_PREPARE_PROGRESS):
                print(f"rank {rank}: {line}", flush=True)

        try:
            manifest, error = prepare(self.cfg.data, log=log), ""
            mine = json.dumps({"key": manifest["key"], "shards": _shards_digest(manifest)})
        except DataError as e:
            mine, error = json.dumps({"error": str(e)}), e
        everyone = [json.loads(v) for v in exchange_without_deadline(mine, dist, log=self.log)]
        if error:
            raise error
        if (failed := next((r for r, v in enumerate(everyone) if "error" in v), None)) is not None:
            raise DataError(f"rank {failed} could not prepare its data: {everyone[failed]['error']}")
        if any(v != everyone[0] for v in everyone):
            differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
            raise DataError(
                f"rank(s) {differ} prepared other data than rank 0 (rank {rank} has {manifest['dir']}, key "
                f"{manifest['key']}; rank 0 has key {everyone[0]['key']}): every node must see the same data.source "
                "and data.* settings; run `mhc-train prepare` once on each node (or on a shared filesystem) before "
                "the launch"
            )
        return manifest

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # DeepSpeed and FSDP build from the meta device: they allocate and fill only what each rank trains
        device = "meta" if builds_on_meta(cfg) else self.device
        self.model = build_model(cfg.model, cfg.connection, seed=t.seed, device=device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, self.dist)
        resume = self._resume_point()
        if self.dist.is_main:
            self._write_run_files()
        weights = self.ckpt.weights_of(resume[0]) if resume is not None else None  # a file checkpoint's weights
        self.engine = build_engine(self.model, cfg, self.dist, weights=weights)
        if line := self.engine.describe():
            self.log(line)
        self.step, self.skipped, self.tokens_seen, self.train_time = 0, 0, 0, 0.0
        self.last_ckpt: Path | None = None
        self.peak_mb = 0.0
        self.timer = StepTimer()  # host time per phase; on CUDA the wait for the GPU lands in "forward_backward"
        self.val_set = self.data.val_batches(t.eval_batches, t.batch_size, t.seq_len)
        # the next micro-batches are drawn on a thread while this one computes (pinned on CUDA)
        self.prefetch = Prefetcher(self._draw, n_micro=t.grad_accum, pin=self.device.type == "cuda")
        if resume is not None:
            self._restore(*resume)

    # ---- the run directory -------------------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        """Rank 0: the resolved config, and a copy of the tokenizer, so the run directory is self-contained."""
        from omegaconf import OmegaConf

        from mhc_train.io.files import atomic_write_text

        atomic_write_text(self.run_dir.config, OmegaConf.to_yaml(OmegaConf.create(self.config_dict)))
        src, dst = Path(self.tokenizer_ref["path"]), self.run_dir.tokenizer
        if src.is_file() and not dst.is_file():
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)

    def close(self) -> None:
        """Release the run directory (also done at the end of `run`)."""
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
        prefetch = getattr(self, "prefetch", None)
        if prefetch is not None:
            prefetch.close()

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _resume_point(self):
        """(state, path, allowed config changes) of the checkpoint to resume from, or None for a fresh start. Rank 0
        picks (verifying digests, moving damaged checkpoints aside) and every rank follows its choice."""
        choice = None
        if self.dist.is_main:
            try:
                path, notes = self.ckpt.choose(self.cfg.checkpoint.resume)
                choice = (str(path) if path else None, notes, None)
            except CheckpointError as e:
                choice = (None, [], e)
        path, notes, error = broadcast_from_main(choice, self.dist)
        if error is not None:
            raise error
        for line in notes:
            self.log(line)
        if path is None:
            if self.cfg.checkpoint.resume == "auto" and (held := holds_a_run(self.run_dir)):
                self.log(f"{self.run_dir.root} holds {held} but no checkpoint that verifies: starting at step 0; "
                         "metrics.jsonl keeps the earlier records under their own segment")  # fmt: skip
            return None
        state, allowed = self.ckpt.read(Path(path), self.config_dict, self.tokenizer_ref)
        return state, Path(path), allowed

    def _restore(self, state: dict, path: Path, allowed: list[str]) -> None:
        for note in self.ckpt.restore(self.engine, state, path):
            self.log(note)
        self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
        self.tokens_seen, self.train_time = state.get("tokens_seen", 0), state.get("train_time", 0.0)
        self.last_ckpt = path
        self.log(f"resumed from {path} at step {self.step}")
        for line in allowed:
            self.log(f"  config change on resume (allowed): {line}")

    def save_checkpoint(self) -> Path:
        """Every rank calls this (the engine's state may be sharded)."""
        meta = {
            "skipped_steps": self.skipped,
            "tokens_seen": self.tokens_seen,
            "train_time": self.train_time,
            "data": {"seed": self.cfg.train.seed, "next_step": self.step},
            "config": self.config_dict,
            "tokenizer": self.tokenizer_ref,
        }
        self.last_ckpt = self.ckpt.save(self.engine, self.step, meta)
        return self.last_ckpt

    # ---- steps -------------------------------------------------------------------------------------------------
    def _draw(self, step: int, micro: int, shard: int, n_shards: int):
        t = self.cfg.train
        return self.data.train_batch(t.seed, step, micro, t.batch_size, t.seq_len, shard, n_shards)

    def _batch(self, micro: int, shard: int, n_shards: int):
        with self.timer("data"):  # the wait for the prefetch (the draw itself when it missed)
            return self.prefetch.get(self.step, micro, shard, n_shards)

    def evaluate(self) -> float:
        """The mean loss over the fixed val batches; every rank evaluates its slice (a collective)."""
        return self.engine.evaluate(self.val_set)

    def _nonfinite(self, loss: float) -> None:
        t = self.cfg.train
        where = f"at step {self.step + 1} (loss {loss})"
        last = str(self.last_ckpt) if self.last_ckpt else "none yet"
        if not t.skip_nonfinite:
            raise TrainingError(
                f"non-finite loss {where}. Last good checkpoint: {last}. Lower optim.lr or raise schedule.warmup_steps, use "
                "train.precision=fp32, or set train.skip_nonfinite=true to skip such steps (they are counted)."
            )
        self.skipped += 1
        self.log(f"skipping the step {where}; {self.skipped} skipped so far")
        if self.skipped > t.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped} non-finite steps (more than train.max_skipped_steps={t.max_skipped_steps}), the last "
                f"{where}. Last good checkpoint: {last}. Lower optim.lr or use train.precision=fp32."
            )

    def _peer_lost(self, e: Exception) -> TrainingError | None:
        """A TrainingError for a communication failure (a peer died), None for anything else."""
        peer_lost = isinstance(e, torch.distributed.DistBackendError) or any(
            s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe", "NCCL", "gloo")
        )
        if self.dist.world == 1 or isinstance(e, TrainingError) or not peer_lost:
            return None
        last = str(self.last_ckpt) if self.last_ckpt else "none yet"
        return TrainingError(
            f"rank {self.dist.rank} of {self.dist.world}: lost a peer at step {self.step + 1} ({type(e).__name__}: "
            f"{str(e)[:200]}). Relaunch the same command (checkpoint.resume=auto) to continue from {last}."
        )

    # ---- preemption --------------------------------------------------------------------------------------------
    def _preempt(self, saved: bool) -> None:
        """Every rank: write a checkpoint (unless this step just did) and stop with the signal's exit code."""
        signum = self.stops.received or signal.SIGTERM
        path = self.last_ckpt if saved else self.save_checkpoint()
        cmd = " ".join(shlex.quote(a) for a in ["python", "-m", "mhc_train.train", *sys.argv[1:]])
        how = "the same torchrun command" if self.dist.world > 1 else cmd
        raise Preempted(
            f"{signal.Signals(signum).name} at step {self.step}: wrote checkpoint {path}. To resume, relaunch {how} "
            "(checkpoint.resume=auto continues from it)",
            128 + signum,
        )

    # ---- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to train.max_steps (or stop_at_step). In the main thread SIGTERM / SIGINT stop it gracefully (see
        `_preempt`); elsewhere (signals reach only the main thread) they keep their handlers."""
        if self.lock.released:  # a second run() owns the directory again
            self.lock.acquire()
        self.stops = StopSignals(lambda: self.step + 1)
        try:
            with self.stops:
                return self._loop()
        finally:
            self.close()

    def _loop(self) -> dict:
        cfg, t, engine = self.cfg, self.cfg.train, self.engine
        metrics = MetricsLogger(self.run_dir.root, cfg.logging, self.config_dict, cfg.run_name, self.dist.is_main)
        tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
        flops = flops_per_token(cfg.model, cfg.connection, t.seq_len)
        peak = device_peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        metrics.log(
            "meta",
            self.step,
            n_params=self.n_params,
            n_streams=self.model.n_streams,
            connection=cfg.connection.type,
            device=str(self.device),
            tokens_per_step=tokens_per_step,
            unigram_entropy=self.data.unigram_entropy("val"),
            flops_per_token=flops,
            peak_tflops=peak,
            world_size=self.dist.world,
            torch=torch.__version__,
        )
        bar = None
        if t.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=cfg.run_name, dynamic_ncols=True)
        diag_batch = self.val_set[0][0][: min(4, t.batch_size)]
        if self.step == 0:  # the curve starts at the untrained model (~ln(vocab))
            metrics.log("val", 0, loss=self.evaluate())
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                with self.timer("forward_backward"):  # includes "data" (the engine pulls its micro-batches)
                    loss = engine.forward_backward(self._batch)
                    # The step's one host sync: the loss (for the non-finite check) and whether any rank received a
                    # stop signal (every rank then stops after this same step), read together. Nothing else in a
                    # step reads the device: the grad norm is read on log steps only, and the optimizer's kernels
                    # are still queued when the next step starts.
                    loss, stop = read_scalars(loss, any_rank_flag(self.stops.received is not None, self.dist))
                if t.dump_grads_at == self.step + 1:
                    grads = engine.gather_grads()  # a collective: every rank calls it
                    if self.dist.is_main:
                        torch.save(grads, self.run_dir.grads(self.step + 1))
                if not np.isfinite(loss):
                    self._nonfinite(loss)
                    engine.skip()
                    self.step += 1
                    if stop:
                        self._preempt(saved=False)
                    continue
                diag_step = t.diag_every and (self.step + 1) % t.diag_every == 0
                local_grads = engine.local_named_grads() if diag_step else None
                layer_norms = grad_norms(local_grads) if local_grads is not None else None
                lr = engine.lr()
                with self.timer("optimizer"):  # clip (a collective where sharded) and step; on CUDA their launch
                    grad_norm = engine.step()  # time: the kernels run on while the next step's batch is read
                self.timer.step()
                dt = time.perf_counter() - t0
                self.step += 1
                if self.step == 1 and (line := engine.report()):
                    self.log(f"rank 0, step 1: {line}")
                self.tokens_seen += tokens_per_step
                self.train_time += dt
                log_step = self.step % t.log_every == 0 or self.step == t.max_steps
                if log_step or diag_step:
                    grad_norm = read_scalars(grad_norm)[0]  # a host read on log steps only
                if log_step:
                    metrics.log(
                        "train",
                        self.step,
                        loss=loss,
                        lr=lr,
                        grad_norm=grad_norm,
                        clipped=bool(cfg.optim.grad_clip > 0 and grad_norm > cfg.optim.grad_clip),
                        time_per_step_s=self.timer.window(),
                        tokens_per_s=tokens_per_step / dt,
                        tokens_per_s_per_device=tokens_per_step / dt / self.dist.world,
                        mfu=mfu(tokens_per_step / dt / self.dist.world, flops["total"], peak),
                        step_time_s=dt,
                        tokens=self.tokens_seen,
                        skipped_steps=self.skipped,
                        peak_mem_mb=(window_peak := peak_memory_mb(self.device)),  # since the last train record
                    )
                    self.peak_mb = max(self.peak_mb, window_peak)
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(self.device)
                last = self.step == t.max_steps or self.step == t.stop_at_step
                is_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                is_ckpt = (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or (
                    last and cfg.checkpoint.save_final
                )
                if diag_step:
                    model = engine.full_model()  # a collective where the weights are sharded or cut
                    if self.dist.is_main:
                        diag = connection_diagnostics(model, diag_batch.to(next(model.parameters()).device))
                        metrics.log("diag", self.step, grad_norms=layer_norms or {"global": grad_norm}, **diag)
                if is_eval:
                    val = self.evaluate()
                    metrics.log("val", self.step, loss=val)
                    if bar:
                        bar.write(f"{cfg.run_name} step {self.step}: val loss {val:.4f}")
                if bar:
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
                    bar.update(1)
                if is_ckpt:
                    self.save_checkpoint()
                if stop:
                    self._preempt(saved=bool(is_ckpt))
                if self.step == t.stop_at_step:
                    self.log(f"stopping at train.stop_at_step={t.stop_at_step}; resume with checkpoint.resume=auto")
                    break
        except Preempted:
            raise
        except (RuntimeError, torch.distributed.DistBackendError) as e:
            lost = self._peer_lost(e)
            if lost is None:
                raise
            raise lost from e
        finally:
            if bar:
                bar.close()
            metrics.close()
        return self.summary()

    def summary(self) -> dict:
        recs = read_metrics(self.run_dir.root)
        val, train = recs.get("val", []), recs.get("train", [])
        return {
            "run_name": self.cfg.run_name,
            "connection": self.cfg.connection.type,
            "steps": self.step,
            "skipped_steps": self.skipped,
            "final_val_loss": val[-1]["loss"] if val else None,
            "final_train_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else None,
            "peak_mem_mb": max(self.peak_mb, peak_memory_mb(self.device)),
            "n_params": self.n_params,
            "pid": os.getpid(),
        }


# prepare's lines that every rank shows: it waits for the lock, or it is the one building (not the reuse notices)
_PREPARE_PROGRESS = tuple(f"prepare: {w} " for w in ("waiting", "sampling", "continuing", "tokenising", "wrote"))


def _shards_digest(manifest: dict) -> str:
    """One digest of a manifest's shard list (names, token counts, sha256), to compare across nodes."""
    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]


def train(cfg: Config, log=print) -> dict:
    return Trainer(cfg, log=log).run()
