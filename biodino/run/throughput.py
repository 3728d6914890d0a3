"""Throughput, data-wait fraction and peak memory, logged as ``perf/*`` every optimizer step."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch


class Throughput(L.Callback):
    """Per optimizer step: images/s per device (source images, not crops), the share of wall time spent waiting for
    data, peak memory; host numbers, recorded in the module's step metrics (no device read)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._last_end: float | None = None  # end of the previous micro-batch
        self._step_start: float | None = None  # end of the previous optimizer step
        self._wait = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._last_end is not None:  # fetching the batch: everything between two micro-batches
            self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        end = time.perf_counter()
        self._last_end = end
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if self._step_start is not None:
            step = end - self._step_start
            pl_module.step_metrics.log_dict(trainer.global_step - 1, {
                "perf/images_per_s": self.batch_size * trainer.accumulate_grad_batches / step,
                "perf/data_wait": self._wait / step,
                "perf/peak_mem_gb": _peak_memory_gb(pl_module.device)})
        self._step_start, self._wait = end, 0.0


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
