"""Preemption under Slurm: on SIGUSR1 every rank finishes the step it is in, a checkpoint is saved, training
stops, and the job requeues itself with ``scontrol requeue``; the requeued job resumes from that checkpoint.

The signal only raises a flag. Ranks receive it at different moments, so at each step's end they agree by an
all-reduce (max), and all save at the same step: a checkpoint is never written from inside a signal handler.
The requeue is issued once training has returned (``requeue_job``), since Slurm then ends the running job.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from biodino.train.checkpointing import StepAndEpochCheckpoint


class Requeue(L.Callback):
    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.received = False  # the signal reached this rank
        self.requested = False  # all ranks saved and stopped: requeue

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        signal.signal(self.signum, self._on_signal)  # before the data workers fork: they inherit a harmless flag

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = True

    def _any_rank_received(self, device: torch.device) -> bool:
        flag = torch.tensor([float(self.received)], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At optimizer-step boundaries only: a checkpoint never holds half-accumulated gradients."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches or not self._any_rank_received(pl_module.device):
            return
        checkpoint = next(c for c in trainer.callbacks if isinstance(c, StepAndEpochCheckpoint))
        checkpoint.save_now(trainer)
        self.requested = True
        trainer.should_stop = True


def requeue_job(trainer: L.Trainer) -> None:
    """``scontrol requeue`` from rank 0 if a ``Requeue`` callback stopped this run."""
    if trainer.is_global_zero and any(isinstance(c, Requeue) and c.requested for c in trainer.callbacks):
        job = os.environ["SLURM_JOB_ID"]
        print(f"SIGUSR1: saved step {trainer.global_step}; requeueing job {job}", flush=True)
        subprocess.run(["scontrol", "requeue", job], check=True)
