"""The loop's metrics component: what a step costs and when it is written down.

`StepMetrics` owns the run's accounting (tokens seen, training time, peak memory, the per-phase `StepTimer`), the
throughput numbers (tokens/s, MFU against the device's peak) and the cadence of `train` records: every
`train.log_every` steps and the last step. It also owns the JSONL/wandb writer (`MetricsLogger`) the other components
write their records through, and the progress bar.

Notes:
- Rank 0 writes; on other ranks the writer is disabled, so every rank may call `record`.
- Peak memory is per window: the CUDA peak counter is reset after each `train` record; the summary takes the
  maximum over all windows.
"""

from __future__ import annotations

import resource

import torch

from mhc_train.config import Config
from mhc_train.parallel import DistInfo
from mhc_train.train.metrics import MetricsLogger
from mhc_train.train.throughput import StepTimer, device_peak_tflops, flops_per_token, mfu


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (peak RSS)


class StepMetrics:
    """Accounting, throughput and the `train` records of a run; `open` before the first step, `close` after."""

    def __init__(self, cfg: Config, config_dict: dict, run_root, dist: DistInfo):
        t = cfg.train
        self.cfg, self.config_dict, self.run_root, self.dist = cfg, config_dict, run_root, dist
        self.device = dist.device
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
        self.flops = flops_per_token(cfg.model, cfg.connection, t.seq_len)
        self.peak = device_peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.timer = StepTimer()  # host time per phase; on CUDA the wait for the GPU lands in "forward_backward"
        self.tokens_seen, self.train_time, self.peak_mb = 0, 0.0, 0.0
        self.writer: MetricsLogger | None = None
        self.bar = None

    def state(self) -> dict:
        """What a checkpoint keeps of the accounting (restored with `load_state`)."""
        return {"tokens_seen": self.tokens_seen, "train_time": self.train_time}

    def load_state(self, state: dict) -> None:
        self.tokens_seen, self.train_time = state.get("tokens_seen", 0), state.get("train_time", 0.0)

    def open(self, step: int, n_params: int, n_streams: int, unigram_entropy: float | None, **extra) -> None:
        """Start this launch's segment of metrics.jsonl with its `meta` record (plus `extra` fields), and the progress
        bar."""
        cfg = self.cfg
        self.writer = MetricsLogger(self.run_root, cfg.logging, self.config_dict, cfg.run_name, self.dist.is_main)
        self.record(
            "meta",
            step,
            n_params=n_params,
            n_streams=n_streams,
            connection=cfg.connection.type,
            device=str(self.device),
            tokens_per_step=self.tokens_per_step,
            unigram_entropy=unigram_entropy,
            flops_per_token=self.flops,
            peak_tflops=self.peak,
            world_size=self.dist.world,
            torch=torch.__version__,
            **extra,
        )
        if cfg.train.progress and self.dist.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.max_steps, initial=step, desc=cfg.run_name, dynamic_ncols=True)

    def record(self, kind: str, step: int, **values) -> None:
        """One record of any kind (the evaluator's `val`, the diagnostics' `diag`)."""
        self.writer.log(kind, step, **values)

    def note(self, line: str) -> None:
        """A line for the progress bar (nothing without one)."""
        if self.bar:
            self.bar.write(line)

    def count_step(self, seconds: float) -> None:
        """A completed optimiser step that took `seconds`."""
        self.tokens_seen += self.tokens_per_step
        self.train_time += seconds

    def due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def log_step(self, step: int, result, skipped: int) -> None:
        """The `train` record of a completed step, on log steps (reads the grad norm: a host sync)."""
        if not self.due(step):
            return
        dt, per_device = result.seconds, self.tokens_per_step / result.seconds / self.dist.world
        grad_clip = self.cfg.optim.grad_clip
        self.record(
            "train",
            step,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            clipped=bool(grad_clip > 0 and result.grad_norm > grad_clip),
            time_per_step_s=self.timer.window(),
            tokens_per_s=self.tokens_per_step / dt,
            tokens_per_s_per_device=per_device,
            mfu=mfu(per_device, self.flops["total"], self.peak),
            step_time_s=dt,
            tokens=self.tokens_seen,
            skipped_steps=skipped,
            peak_mem_mb=(window_peak := peak_memory_mb(self.device)),  # since the last train record
        )
        self.peak_mb = max(self.peak_mb, window_peak)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def advance(self, result) -> None:
        """Move the progress bar on by one step."""
        if self.bar:
            self.bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{self.tokens_per_step / result.seconds:,.0f}")
            self.bar.update(1)

    def tokens_per_s(self) -> float | None:
        return self.tokens_seen / self.train_time if self.train_time else None

    def peak_memory(self) -> float:
        return max(self.peak_mb, peak_memory_mb(self.device))

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
