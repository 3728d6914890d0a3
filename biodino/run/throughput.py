"""Throughput, data-wait fraction and peak memory, logged as ``perf/*`` every optimizer step."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning as L
import torch


class Throughput(L.Callback):
    """Images/s per device (source images, not crops), share of wall time spent waiting for data, peak memory."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._last_end: float | None = None
        self._start = 0.0
        self._wait = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        if self._last_end is not None:
            self._wait = self._start - self._last_end  # fetching the batch: everything between two steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        end = time.perf_counter()
        if self._last_end is not None:
            step = end - self._last_end
            pl_module.log_dict({"perf/images_per_s": self.batch_size / step,
                                "perf/data_wait": self._wait / step,
                                "perf/peak_mem_gb": _peak_memory_gb(pl_module.device)},
                               on_step=True, on_epoch=False)
        self._last_end = end


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
