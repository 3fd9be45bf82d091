"""Per-run cost figures: median training-step time, peak memory, wall time.

Medians, not means: the first steps pay for lazy initialisation and the odd step for a
validation loop or a checkpoint write. Memory is the peak of the process's resident set sampled
at every step on CPU (per run, even when Hydra runs several jobs in one process) and
``torch.cuda.max_memory_allocated`` on GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch.callbacks import Callback


class RunStats(Callback):
    """Time every training step and track peak memory; log ``perf/*`` at the end of fit."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.peak_memory_mb = 0.0
        self.fit_wall_s = 0.0
        self._step_start = 0.0
        self._fit_start = 0.0
        self._process = psutil.Process()

    def _cuda(self, pl_module: pl.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step_times.clear()
        self.peak_memory_mb = 0.0
        if self._cuda(pl_module):
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._fit_start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
        self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = self._process.memory_info().rss / 2**20
        self.step_times.append(time.perf_counter() - self._step_start)
        self.peak_memory_mb = max(self.peak_memory_mb, peak)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_wall_s = time.perf_counter() - self._fit_start
        summary = self.summary()
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)

    def summary(self) -> dict[str, float]:
        """``perf/step_time_median_s``, ``perf/peak_memory_mb``, ``perf/fit_wall_s``, ``perf/steps``."""
        return {
            "perf/step_time_median_s": statistics.median(self.step_times) if self.step_times else 0.0,
            "perf/peak_memory_mb": self.peak_memory_mb,
            "perf/fit_wall_s": self.fit_wall_s,
            "perf/steps": float(len(self.step_times)),
        }
