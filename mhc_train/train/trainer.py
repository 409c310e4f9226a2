"""The training loop: data, model, optimiser, checkpoints, metrics and diagnostics for one run on one process.

Notes:
1. Batches are a function of (seed, step, micro-batch), and the checkpoint carries every RNG state, so a resumed run
   continues bit for bit on CPU (tested).
2. The step counter `step` is the number of completed optimiser steps; metrics are logged at that value.
3. A NaN or inf loss stops the run (naming the step and the last good checkpoint) unless `train.skip_nonfinite`,
   which skips and counts such steps, up to `train.max_skipped_steps`.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mhc_train.config import Config, to_dict, validate, validate_world
from mhc_train.data import TokenData, prepare
from mhc_train.model import build_model
from mhc_train.parallel import apply_recompute
from mhc_train.parallel.data_parallel import DeepSpeedEngine, TorchEngine, barrier, init_distributed, mean_across_ranks
from mhc_train.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    compare_configs,
    load_dcp,
    optimizer_groups_by_name,
    save_dcp,
)
from mhc_train.train.diagnostics import connection_diagnostics, grad_norms
from mhc_train.train.metrics import MetricsLogger
from mhc_train.train.optim import build_optimizer, build_scheduler


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message names the step, the last checkpoint and the fix."""


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


class Trainer:
    def __init__(self, cfg: Config, log=print):
        validate(cfg)
        t = cfg.train
        validate_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group starts
        if t.threads:
            torch.set_num_threads(t.threads)
        device_type = (
            "cuda" if t.device == "auto" and torch.cuda.is_available() else ("cpu" if t.device == "auto" else t.device)
        )
        self.dist = init_distributed(device_type)
        self.cfg = cfg
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        log = self.log
        self.device = torch.device(device_type, self.dist.local_rank) if device_type == "cuda" else torch.device("cpu")
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        if self.dist.is_main:
            prepare(cfg.data, log=log)  # reuses the output when the input is unchanged
        barrier(self.dist)
        manifest = prepare(cfg.data, log=lambda *a: None)
        self.data = TokenData(cfg.data.out_dir)
        self.data.check_compatible(cfg.model.vocab_size, t.seq_len)
        self.tokenizer_ref = {"path": manifest["tokenizer"]["path"], "sha256": manifest["tokenizer"]["sha256"]}

        self.model = build_model(cfg.model, cfg.connection, seed=t.seed, device=self.device)
        self.config_dict = to_dict(cfg)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint)
        resume = self._read_checkpoint()  # weights go into the plain model before any wrapping
        p = cfg.parallel
        make_optimizer = lambda m: build_optimizer(m, cfg.optim)  # engines build them on the modules they train
        make_scheduler = lambda o: build_scheduler(o, t.max_steps, cfg.schedule)
        if p.pp > 1:  # stages are cut from the plain model; recompute is applied per stage (blocks never cross)
            from mhc_train.parallel.pipeline import PipelineEngine

            self.engine = PipelineEngine(
                self.model,
                p.pp_schedule,
                p.pp_microbatches or 2 * p.pp,
                self.dist,
                self.device,
                cfg.optim.grad_clip,
                p.recompute,
                p.recompute_block,
                make_optimizer,
                make_scheduler,
                overlap=p.pp_overlap,
                pp=p.pp,
                stages_per_rank=p.pp_stages_per_rank,
                csv_path=p.pp_schedule_csv,
            )
        else:
            apply_recompute(self.model, p.recompute, p.recompute_block)
            if p.engine == "deepspeed":
                self.engine = DeepSpeedEngine(
                    self.model,
                    make_optimizer,
                    make_scheduler,
                    cfg.optim.grad_clip,
                    self.dist,
                    p.zero_stage,
                    t.batch_size // self.dist.world,
                    t.grad_accum,
                    self.autocast_dtype == torch.bfloat16,
                    p.deepspeed_config,
                )
            elif p.engine == "fsdp":
                from mhc_train.parallel.fsdp import FSDPEngine

                self.engine = FSDPEngine(
                    self.model,
                    make_optimizer,
                    make_scheduler,
                    cfg.optim.grad_clip,
                    self.dist,
                    self.device,
                )
            else:
                opt = make_optimizer(self.model)
                self.engine = TorchEngine(
                    self.model, opt, make_scheduler(opt), cfg.optim.grad_clip, self.dist, p.engine == "ddp"
                )
        if hasattr(self.engine, "describe"):
            self.log(self.engine.describe())
        fwd = self.engine.forward
        self.forward = torch.compile(fwd) if t.compile and fwd is not None else fwd
        self.step, self.skipped, self.tokens_seen, self.train_time = 0, 0, 0, 0.0
        self.last_ckpt: Path | None = None
        self.val_set = self.data.val_batches(t.eval_batches, t.batch_size, t.seq_len)
        if resume is not None:
            self._restore(*resume)

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _read_checkpoint(self):
        """(state, path, allowed config changes) of the checkpoint to resume from, checked against this config, with
        the model weights already loaded into `self.model`; None for a fresh start."""
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = self.ckpt.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        state = CheckpointManager.load(path)
        fatal, allowed = compare_configs(state["config"], self.config_dict)
        if fatal:
            raise CheckpointError(
                f"cannot resume from {path}: the config changes the model. Differing keys:\n  "
                + "\n  ".join(fatal)
                + "\nRestore these values, or start a new run (another run_dir, or checkpoint.resume=never)."
            )
        tok = state.get("tokenizer", {})
        if tok.get("sha256") and tok["sha256"] != self.tokenizer_ref["sha256"]:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with tokenizer {tok['path']} (sha256 {tok['sha256'][:12]}) "
                f"but the data now uses {self.tokenizer_ref['path']} (sha256 {self.tokenizer_ref['sha256'][:12]}); "
                "point data.out_dir / data.tokenizer_model back at the original tokenizer"
            )
        if not state.get("dcp"):  # a DCP checkpoint's weights are loaded into the engine's tensors, after it exists
            self.model.load_state_dict(state["model"])
        return state, path, allowed

    def _restore(self, state: dict, path: Path, allowed: list[str]) -> None:
        """Engine (optimizer, scheduler), RNG and counters from a checkpoint read by `_read_checkpoint`."""
        if state.get("deepspeed_tag"):
            self.engine.load_sharded(self.ckpt.dir / "deepspeed", state["deepspeed_tag"])
        elif state.get("dcp"):
            if getattr(self.engine, "dcp_state", None) is None:
                raise CheckpointError(
                    f"{path} is a DCP checkpoint; parallel.engine=deepspeed cannot load it (use none, ddp, fsdp or "
                    "a pipeline)"
                )
            load_dcp(self.engine.dcp_state(), self.ckpt.dir / "dcp" / state["dcp"])
            for group in self.engine.optimizer.param_groups:  # the hyper-parameters the scheduler last set (lr)
                group.update(state["optimizer_groups"].get(group["name"], {}))
            self.engine.scheduler.load_state_dict(state["scheduler"])
            sync = getattr(self.engine, "sync_full_model", None)
            if sync is not None:
                sync()  # rank 0's plain model gets the loaded weights too
        else:
            self.engine.load_state_dict(state)
        _set_rng_state(state["rng"])
        self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
        self.tokens_seen, self.train_time = state.get("tokens_seen", 0), state.get("train_time", 0.0)
        self.last_ckpt = path
        self.log(f"resumed from {path} at step {self.step}")
        for line in allowed:
            self.log(f"  config change on resume (allowed): {line}")

    def checkpoint_format(self) -> str:
        """file | dcp | deepspeed, from checkpoint.format and the engine."""
        if self.engine.name == "deepspeed":
            return "deepspeed"
        fmt = self.cfg.checkpoint.format
        return ("dcp" if self.engine.name in ("pipeline", "fsdp") else "file") if fmt == "auto" else fmt

    def save_checkpoint(self) -> Path:
        """Every rank calls this. Sharded engine state first (all ranks), then rank 0's atomic checkpoint file."""
        tag, dcp_tag, fmt = None, None, self.checkpoint_format()
        if fmt == "dcp":
            dcp_tag = f"step_{self.step:08d}"
            save_dcp(self.engine.dcp_state(), self.ckpt.dir / "dcp" / dcp_tag)
            groups = optimizer_groups_by_name(self.engine.optimizer)
            engine_state = {"scheduler": self.engine.scheduler.state_dict(), "optimizer_groups": groups}
            barrier(self.dist)
        else:
            engine_state = self.engine.state_dict()  # a collective under a pipeline or FSDP: every rank calls it
        if fmt == "deepspeed":
            tag = f"step_{self.step:08d}"
            self.engine.save_sharded(self.ckpt.dir / "deepspeed", tag)
            barrier(self.dist)
        if not self.dist.is_main:
            barrier(self.dist)
            self.last_ckpt = self.ckpt.path_for(self.step)
            return self.last_ckpt
        state = {
            **({} if dcp_tag else {"model": self.model.state_dict()}),
            **engine_state,  # optimizer + scheduler (file format), the scheduler (dcp); deepspeed: its shards
            "deepspeed_tag": tag,
            "dcp": dcp_tag,
            "world_size": self.dist.world,
            "step": self.step,
            "skipped_steps": self.skipped,
            "tokens_seen": self.tokens_seen,
            "train_time": self.train_time,
            "rng": _rng_state(),
            "data": {"seed": self.cfg.train.seed, "next_step": self.step},
            "config": self.config_dict,
            "tokenizer": self.tokenizer_ref,
        }
        self.last_ckpt = self.ckpt.save(self.step, state)
        barrier(self.dist)
        return self.last_ckpt

    # ---- steps -------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, forward=None) -> torch.Tensor:
        with self._autocast():
            logits = (forward or self.forward)(x.to(self.device))
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Rank 0 only, on the plain model (no engine wrapper, so no collective can wait on the other ranks)."""
        self.model.eval()
        losses = [self._loss(x, y, forward=self.model).item() for x, y in self.val_set]
        self.model.train()
        return float(np.mean(losses))

    def train_step(self) -> dict:
        t, step = self.cfg.train, self.step
        if self.engine.name == "pipeline":  # the schedule runs forward and backward of every micro-batch
            e = self.engine  # this data-parallel replica's slice of the global batch
            x, y = self.data.train_batch(t.seed, step, 0, t.batch_size, t.seq_len, e.dp_rank, e.dp)
            loss = e.run(x, y)
            if t.dump_grads_at == step + 1:
                grads = self.engine.gather_grads()  # a collective: every stage's gradients by name, on rank 0
                if self.dist.is_main:
                    torch.save(grads, self.run_dir / f"grads_step_{step + 1}.pt")
            return {"loss": loss, "grad_norm": self.engine.clip()}
        total = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x, y = self.data.train_batch(t.seed, step, micro, t.batch_size, t.seq_len, self.dist.rank, self.dist.world)
            loss = self._loss(x, y)
            self.engine.backward(loss, micro, t.grad_accum)
            total += loss.detach() / t.grad_accum
        loss_value = mean_across_ranks(total.item(), self.dist, self.device)
        if t.dump_grads_at == step + 1:
            if self.engine.name in ("fsdp", "deepspeed"):
                grads = self.engine.gather_grads()  # a collective: every rank calls it
            else:
                grads = {
                    n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters() if p.grad is not None
                }
            if self.dist.is_main:
                torch.save(grads, self.run_dir / f"grads_step_{step + 1}.pt")
        norm = self.engine.clip()
        return {"loss": loss_value, "grad_norm": norm}

    def _nonfinite(self, loss: float) -> None:
        t = self.cfg.train
        where = f"at step {self.step + 1} (loss {loss})"
        last = str(self.last_ckpt) if self.last_ckpt else "none yet"
        if not t.skip_nonfinite:
            raise TrainingError(
                f"non-finite loss {where}. Last good checkpoint: {last}. Lower optim.lr or raise optim.warmup, use "
                "train.precision=fp32, or set train.skip_nonfinite=true to skip such steps (they are counted)."
            )
        self.skipped += 1
        self.log(f"skipping the step {where}; {self.skipped} skipped so far")
        if self.skipped > t.max_skipped_steps:
            raise TrainingError(
                f"{self.skipped} non-finite steps (more than train.max_skipped_steps={t.max_skipped_steps}), the last "
                f"{where}. Last good checkpoint: {last}. Lower optim.lr or use train.precision=fp32."
            )

    # ---- loop --------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        metrics = MetricsLogger(self.run_dir, cfg.logging, self.config_dict, cfg.run_name, enabled=self.dist.is_main)
        tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
        n_params = sum(p.numel() for p in self.model.parameters())
        metrics.log(
            "meta",
            self.step,
            n_params=n_params,
            n_streams=self.model.n_streams,
            connection=cfg.connection.type,
            device=str(self.device),
            tokens_per_step=tokens_per_step,
            unigram_entropy=self.data.unigram_entropy("val"),
            torch=torch.__version__,
        )
        bar = None
        if t.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc=cfg.run_name, dynamic_ncols=True)
        diag_batch = self.val_set[0][0][: min(4, t.batch_size)].to(self.device)
        if self.step == 0 and self.dist.is_main:  # the curve starts at the untrained model (~ln(vocab))
            metrics.log("val", 0, loss=self.evaluate())
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                out = self.train_step()
                if not np.isfinite(out["loss"]):
                    self._nonfinite(out["loss"])
                    self.engine.skip()
                    self.step += 1
                    continue
                diag_step = t.diag_every and (self.step + 1) % t.diag_every == 0
                layer_norms = grad_norms(self.model) if diag_step and self.engine.name == "torch" else None
                lr = self.engine.lr()
                self.engine.step()
                if not np.isfinite(out["grad_norm"]):  # deepspeed: the norm is known after its step
                    out["grad_norm"] = self.engine.pre_clip_norm()
                clip = self.cfg.optim.grad_clip
                out["clipped"] = bool(clip > 0 and out["grad_norm"] > clip)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                if self.step == 1 and getattr(self.engine, "overlap", None) is not None:
                    self.log(f"rank 0, step 1: {self.engine.overlap_report()}")
                self.tokens_seen += tokens_per_step
                self.train_time += dt
                tps = tokens_per_step / dt
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    metrics.log(
                        "train",
                        self.step,
                        loss=out["loss"],
                        lr=lr,
                        grad_norm=out["grad_norm"],
                        clipped=out["clipped"],
                        tokens_per_s=tps,
                        step_time_s=dt,
                        tokens=self.tokens_seen,
                        skipped_steps=self.skipped,
                        peak_mem_mb=peak_memory_mb(self.device),
                    )
                every = cfg.checkpoint.every
                last = self.step == t.max_steps or self.step == t.stop_at_step
                is_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                is_ckpt = (every and self.step % every == 0) or (last and cfg.checkpoint.save_final)
                sync = getattr(self.engine, "sync_full_model", None)  # engines that train a sharded/cut copy
                if sync is not None and (diag_step or is_eval or (is_ckpt and self.checkpoint_format() != "dcp")):
                    sync()  # a collective: rank 0's plain model gets the trained weights
                if diag_step and self.dist.is_main:
                    diag = connection_diagnostics(self.model, diag_batch)
                    metrics.log("diag", self.step, grad_norms=layer_norms or {"global": out["grad_norm"]}, **diag)
                if is_eval and self.dist.is_main:
                    val = self.evaluate()
                    metrics.log("val", self.step, loss=val)
                    if bar:
                        bar.write(f"{cfg.run_name} step {self.step}: val loss {val:.4f}")
                if bar:
                    bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    bar.update(1)
                if is_ckpt:
                    self.save_checkpoint()
                if self.step == t.stop_at_step:
                    self.log(f"stopping at train.stop_at_step={t.stop_at_step}; resume with checkpoint.resume=auto")
                    break
        except (RuntimeError, torch.distributed.DistBackendError) as e:
            peer_lost = isinstance(e, torch.distributed.DistBackendError) or any(
                s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe", "NCCL", "gloo")
            )
            if self.dist.world == 1 or isinstance(e, TrainingError) or not peer_lost:
                raise
            last = str(self.last_ckpt) if self.last_ckpt else "none yet"
            raise TrainingError(
                f"rank {self.dist.rank} of {self.dist.world}: lost a peer at step {self.step + 1} ({type(e).__name__}: "
                f"{str(e)[:200]}). Relaunch the same command (checkpoint.resume=auto) to continue from {last}."
            ) from e
        finally:
            if bar:
                bar.close()
            metrics.close()
        return self.summary()

    def summary(self) -> dict:
        from mhc_train.train.metrics import read_metrics

        recs = read_metrics(self.run_dir)
        val = recs.get("val", [])
        train = recs.get("train", [])
        return {
            "run_name": self.cfg.run_name,
            "connection": self.cfg.connection.type,
            "steps": self.step,
            "skipped_steps": self.skipped,
            "final_val_loss": val[-1]["loss"] if val else None,
            "final_train_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": self.tokens_seen / self.train_time if self.train_time else None,
            "peak_mem_mb": peak_memory_mb(self.device),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "pid": os.getpid(),
        }


def train(cfg: Config, log=print) -> dict:
    return Trainer(cfg, log=log).run()
