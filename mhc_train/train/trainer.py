"""The training loop: data, an engine (mhc_train.parallel), and the components that own their cadence.

The trainer builds the plain model, loads a checkpoint's weights into it, hands it to `build_engine`, and from then on
drives the `Engine` interface only; it never asks which engine it holds. The loop is `train_step()` followed by one
call per component, each deciding for itself whether this step is its step:

    StepMetrics   (step_metrics.py)  accounting, throughput/MFU, the step timer, `train` records every log_every
    Diagnostics   (diagnostics.py)   `diag` records every diag_every, the gradient dump
    Evaluator     (evaluator.py)     `val` records every eval_every
    Checkpointer  (checkpointer.py)  resume, save every checkpoint.every and at the end
    NonFinitePolicy (nonfinite.py), Preemption (preemption.py): stop or skip on a NaN loss; stop on SIGTERM/SIGINT

Notes:
1. Batches are a function of (seed, step, micro-batch), and the checkpoint carries every RNG state, so a resumed run
   continues bit for bit on CPU (tested).
2. The step counter `step` is the number of completed optimiser steps; metrics are logged at that value.
3. Every rank agrees on the data before building anything (`mhc_train.data.agreement`).
4. Lines go to the module logger (`mhc_train.train.*`); the CLI installs the rank filter (`setup_logging`), so only
   rank 0 prints them. Python users configure logging themselves.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mhc_train.config import Config, arm_name, to_dict, validate_world
from mhc_train.config.validate import validate_launch
from mhc_train.data import TokenData
from mhc_train.data.agreement import prepare_agreed
from mhc_train.data.blend import prepare_blend
from mhc_train.data.loader import Prefetcher
from mhc_train.io.log import ensure_logging, get_logger
from mhc_train.io.rundir import RunDir
from mhc_train.model import build_model
from mhc_train.model.documents import document_kernel
from mhc_train.parallel import (
    build_engine,
    builds_on_meta,
    exchange_without_deadline,
    init_distributed,
    read_scalars,
)
from mhc_train.train.checkpointer import Checkpointer
from mhc_train.train.diagnostics import Diagnostics
from mhc_train.train.errors import Preempted, TrainingError
from mhc_train.train.evaluator import Evaluator
from mhc_train.train.lock import claim_run_dir
from mhc_train.train.metrics import read_metrics
from mhc_train.train.nonfinite import NonFinitePolicy
from mhc_train.train.preemption import Preemption
from mhc_train.train.step_metrics import StepMetrics
from mhc_train.train.threads import cpu_threads

__all__ = ["Preempted", "Trainer", "TrainingError", "train"]

logger = get_logger(__name__)


@dataclass
class StepResult:
    """What `train_step` hands the components. `grad_norm` is read from the device on first use only (log and diag
    steps), so other steps keep their one host sync."""

    loss: float
    stop: bool  # some rank received SIGTERM / SIGINT: every rank stops after this step
    finite: bool = True  # False: a non-finite loss, the step was skipped
    lr: float = 0.0
    seconds: float = 0.0
    raw_grad_norm: torch.Tensor | float = 0.0  # as the engine returned it

    @property
    def grad_norm(self) -> float:
        if isinstance(self.raw_grad_norm, torch.Tensor):
            self.raw_grad_norm = read_scalars(self.raw_grad_norm)[0]
        return self.raw_grad_norm


class Trainer:
    def __init__(self, cfg: Config):
        # `cfg` was validated where it was made (load_config); the model's part again by build_model. What needs the
        # launch is checked here, before any process group starts.
        validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        validate_launch(cfg, os.environ)  # a data-parallel engine without torchrun: one line, not its traceback
        t = cfg.train
        if t.threads:
            torch.set_num_threads(cpu_threads(t.threads, os.environ))  # never more than the node's cores allow
        self.cfg, self.config_dict = cfg, to_dict(cfg)
        self.dist = init_distributed(t.device, cfg.parallel.timeout_s)
        self.device = self.dist.device
        self.run_dir = RunDir(cfg.run_dir)

        def exchange(value: str) -> list[str]:  # no deadline: another rank may still be building the data
            return exchange_without_deadline(value, self.dist)

        if cfg.data.blend:  # several sources, each prepared on its own, drawn by weight (data/blend.py)
            self.data, manifest = prepare_blend(cfg.data, self.dist.rank, exchange, t.grad_accum)
        else:
            manifest = prepare_agreed(cfg.data, self.dist.rank, exchange)
            self.data = TokenData(manifest["dir"], verify=cfg.data.verify)  # the directory prepare() made or reused
        self.data.check_compatible(cfg.model.vocab_size, t.seq_len, cfg.model.vocab_padded)
        self.tokenizer_ref = {"path": manifest["tokenizer"]["path"], "sha256": manifest["tokenizer"]["sha256"]}
        self.eos_id = manifest["tokenizer"].get("eos_id")  # where documents end (data.document_mask)
        # after the data: a data error leaves no run directory behind
        self.lock = claim_run_dir(self.run_dir, cfg.checkpoint, self.dist)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # sharded engines and pipelines build from the meta device: they allocate and fill only what each rank trains
        device = "meta" if builds_on_meta(cfg) else self.device
        self.model = build_model(cfg.model, cfg.connection, seed=t.seed, device=device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        if cfg.data.document_mask:  # attention within each document of a packed window (model/documents.py)
            if self.eos_id is None:
                raise TrainingError("data.document_mask=true needs the EOS id in the data manifest: prepare it again")
            kernel = document_kernel(cfg.data.document_mask_kernel, self.device)  # auto: flex on CUDA, else sdpa
            self.model.use_documents(self.eos_id, cfg.data.document_rope_restart, kernel)
        self.checkpointer = Checkpointer(cfg, self.config_dict, self.tokenizer_ref, self.run_dir, self.dist)
        resume = self.checkpointer.resume_point()
        if self.dist.is_main:
            self._write_run_files()
        weights = self.checkpointer.weights_of(resume[0]) if resume is not None else None  # a file checkpoint's
        self.engine = build_engine(self.model, cfg, self.dist, weights=weights)
        if line := self.engine.describe():
            logger.info(line)
        self.step = 0
        self.metrics = StepMetrics(cfg, self.config_dict, self.run_dir.root, self.dist)
        self.nonfinite = NonFinitePolicy(t)
        self.evaluator = Evaluator(cfg, self.engine, self.data, self.metrics)
        diag_batch = self.evaluator.val_set[0][0][: min(4, t.batch_size)]
        self.diagnostics = Diagnostics(t.diag_every, t.dump_grads_at, diag_batch, self.dist, self.run_dir.grads)
        # the next micro-batches are drawn on a thread while this one computes (pinned on CUDA)
        self.prefetch = Prefetcher(self._draw, n_micro=t.grad_accum, pin=self.device.type == "cuda")
        if resume is not None:
            state, path, allowed = resume
            self.checkpointer.restore(self.engine, state, path, allowed)
            self.step, self.nonfinite.skipped = state["step"], state.get("skipped_steps", 0)
            self.metrics.load_state(state)
            if 0 < t.stop_at_step <= self.step:  # the loop would never meet it and train on to max_steps
                raise TrainingError(
                    f"train.stop_at_step={t.stop_at_step} is not after step {self.step}, where this run resumes "
                    f"(from {path}); set it above {self.step} (or 0 to train to train.max_steps={t.max_steps})"
                )

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
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None:  # an asynchronous save in flight is finished first, under the run's lock
            checkpointer.close()
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
        prefetch = getattr(self, "prefetch", None)
        if prefetch is not None:
            prefetch.close()

    def save_checkpoint(self) -> Path:
        """Every rank calls this (the engine's state may be sharded)."""
        return self.checkpointer.save(self.engine, self.step, self._progress())

    def _progress(self) -> dict:
        """The loop's counters a checkpoint keeps."""
        return {"skipped_steps": self.nonfinite.skipped, **self.metrics.state()}

    def evaluate(self) -> float:
        """The mean loss over the fixed val batches; every rank evaluates its slice (a collective)."""
        return self.evaluator.evaluate()

    # ---- steps -------------------------------------------------------------------------------------------------
    def _draw(self, step: int, micro: int, shard: int, n_shards: int):
        t = self.cfg.train
        return self.data.train_batch(t.seed, step, micro, t.batch_size, t.seq_len, shard, n_shards)

    def _batch(self, micro: int, shard: int, n_shards: int):
        with self.metrics.timer("data"):  # the wait for the prefetch (the draw itself when it missed)
            return self.prefetch.get(self.step, micro, shard, n_shards)

    def train_step(self) -> StepResult:
        """One optimiser step (or, under the non-finite policy, a skipped one); advances `step` either way."""
        engine, step, timer = self.engine, self.step + 1, self.metrics.timer
        t0 = time.perf_counter()
        with timer("forward_backward"):  # includes "data" (the engine pulls its micro-batches)
            loss = engine.forward_backward(self._batch)
            # The step's one host sync: the loss (for the non-finite check) and whether any rank received a stop
            # signal (every rank then stops after this same step), read together. Nothing else in a step reads the
            # device: the grad norm is read on log steps only, and the optimizer's kernels are still queued when the
            # next step starts.
            loss, stop = read_scalars(loss, self.preemption.flag())
        self.diagnostics.dump_grads(engine, step)
        if not self.nonfinite.accept(loss, step, self.checkpointer.last):
            engine.skip()
            self.step = step
            return StepResult(loss, bool(stop), finite=False)
        self.diagnostics.collect(engine, step)  # before the optimizer step consumes the grads
        lr = engine.lr()
        with timer("optimizer"):  # clip (a collective where sharded) and step; on CUDA their launch time: the
            grad_norm = engine.step()  # kernels run on while the next step's batch is read
        timer.step()
        dt = time.perf_counter() - t0
        self.step = step
        if step == 1 and (line := engine.report()):
            logger.info(f"rank 0, step 1: {line}")
        self.metrics.count_step(dt)
        return StepResult(loss, bool(stop), lr=lr, seconds=dt, raw_grad_norm=grad_norm)

    # ---- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to train.max_steps (or stop_at_step). In the main thread SIGTERM / SIGINT stop it gracefully (see
        `Preemption`); elsewhere (signals reach only the main thread) they keep their handlers."""
        if self.lock.released:  # a second run() owns the directory again
            self.lock.acquire()
        self.preemption = Preemption(self.dist, lambda: self.step + 1, self.checkpointer.wait)
        try:
            with self.preemption:
                return self._loop()
        finally:
            self.close()

    def _loop(self) -> dict:
        t = self.cfg.train
        # from the manifest; one written before prepare stored it is read through on rank 0 alone (the one writer)
        entropy = self.data.unigram_entropy("val") if self.dist.is_main else None
        self.metrics.open(self.step, self.n_params, self.model.n_streams, entropy, **self._blend_meta())
        try:
            self.evaluator.at_start(self.step)
            while self.step < t.max_steps:
                result = self.train_step()
                saved = None
                if result.finite:
                    self.metrics.log_step(self.step, result, self.nonfinite.skipped)
                    self.diagnostics.log(self.engine, self.step, result, self.metrics)
                    self.evaluator.maybe_run(self.step)
                    self.metrics.advance(result)
                    saved = self.checkpointer.maybe_save(self.engine, self.step, self._progress())
                if result.stop:
                    self.preemption.stop(self.step, saved or self.save_checkpoint())
                if result.finite and self.step == t.stop_at_step:
                    logger.info(f"stopping at train.stop_at_step={t.stop_at_step}; resume with checkpoint.resume=auto")
                    break
            self.checkpointer.wait()  # an asynchronous save in flight: committed before the run reports its end
        except (RuntimeError, torch.distributed.DistBackendError) as e:
            if (lost := _peer_lost(e, self.dist, self.step, self.checkpointer.last)) is None:
                raise
            raise lost from e
        finally:
            self.metrics.close()
        return self.summary()

    def _blend_meta(self) -> dict:
        """A blend's weights and each source's realised share of the run's training tokens (for the meta record)."""
        if not self.cfg.data.blend or not self.dist.is_main:  # only rank 0 writes the record: the others skip the draw
            return {}
        t, labels = self.cfg.train, self.data.labels
        shares = self.data.token_shares(t.seed, t.max_steps, t.batch_size)
        return {"blend_weights": dict(zip(labels, self.data.weights.round(6).tolist())), "token_share": shares}

    def summary(self) -> dict:
        recs = read_metrics(self.run_dir.root)
        val, train = recs.get("val", []), recs.get("train", [])
        return {
            "run_name": self.cfg.run_name,
            "connection": self.cfg.connection.type,
            "arm": arm_name(self.cfg),  # what `compare` groups runs by (mhc_train.config.arm)
            "steps": self.step,
            "skipped_steps": self.nonfinite.skipped,
            "final_val_loss": val[-1]["loss"] if val else None,
            "final_train_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": self.metrics.tokens_per_s(),
            "peak_mem_mb": self.metrics.peak_memory(),
            "n_params": self.n_params,
            "pid": os.getpid(),
        }


def _peer_lost(e: Exception, dist, step: int, last_ckpt: Path | None) -> TrainingError | None:
    """A TrainingError for a communication failure (a peer died) during `step`'s successor, None for anything else."""
    peer_lost = isinstance(e, torch.distributed.DistBackendError) or any(
        s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe", "NCCL", "gloo")
    )
    if dist.world == 1 or isinstance(e, TrainingError) or not peer_lost:
        return None
    last = str(last_ckpt) if last_ckpt else "none yet"
    return TrainingError(
        f"rank {dist.rank} of {dist.world}: lost a peer at step {step + 1} ({type(e).__name__}: "
        f"{str(e)[:200]}). Relaunch the same command (checkpoint.resume=auto) to continue from {last}."
    )


def train(cfg: Config) -> dict:
    """Train one run to its end. Lines go to the `mhc_train` logger; where nobody configured it, they print as the
    CLI prints them (`mhc_train.io.log.ensure_logging`)."""
    ensure_logging(int(os.environ.get("RANK", "0")))
    return Trainer(cfg).run()
