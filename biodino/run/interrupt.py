"""Stopping on a signal without losing training: SIGTERM and SIGINT (and SIGUSR1 under Slurm) save a checkpoint at
the next optimizer-step boundary agreed by all ranks, then training stops.

Slurm sends SIGTERM on ``scancel``, at the time limit and on preemption without ``--signal``; Kubernetes, SGE and a
plain ``kill`` send only SIGTERM; Ctrl-C sends SIGINT. The run then exits with 128 + the signal (143, 130), so an
``afterok`` chain or a script does not take a stopped stage for a finished one. Under Slurm, SIGUSR1 (the
template's ``--signal=USR1@120``) saves the same way and requeues the job with ``scontrol requeue``; the requeued job
resumes from that checkpoint. A second identical signal stops at once (the newest complete checkpoint stays).

A handler only records the signal: ranks receive it at different moments, so at each step's end they agree by an
all-reduce (max) and all save at the same step. Nothing is written from inside a signal handler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist

from biodino.run.checkpointing import StepCheckpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PRIORITY = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # agreed by max over ranks: a flag per signal


class StopOnSignal(L.Callback):
    """Installed on every run; ``requeue`` (under Slurm) adds SIGUSR1 with a requeue after the save."""

    def __init__(self, requeue: bool = False) -> None:
        self.signals = (*STOP_SIGNALS, signal.SIGUSR1) if requeue else STOP_SIGNALS
        self.received: set[int] = set()
        self.stopped_by: Optional[int] = None  # the signal training stopped for, once all ranks saved
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After Lightning installed its own handlers (its SIGTERM handling raises mid-accumulation): ours replace
        them for the training loop. Data workers are forked later and ignore these signals (see the DataModule).

        Lightning's loop also broadcasts its SIGTERM flag from rank 0 before every micro-batch and reads it on the
        host: a device sync per micro-batch. With our handlers in place that flag stays false, so the broadcast is
        switched off; a SIGTERM Lightning caught during setup is handed over to ours."""
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        connector = trainer._signal_connector
        if connector.received_sigterm:
            self.received.add(signal.SIGTERM)
            connector.received_sigterm = False
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum in self.received:  # the same signal twice: stop now, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received.add(signum)
        print(f"{signal.Signals(signum).name}: saving at the end of this optimizer step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def _agreed(self, device: torch.device) -> Optional[int]:
        """The signal any rank received, the same on every rank (one all-reduce when there are several ranks)."""
        flags = [float(s in self.received) for s in PRIORITY]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor(flags, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = tensor.tolist()
        chosen = [s for s, f in zip(PRIORITY, flags) if f and s in self.signals]
        return chosen[0] if chosen else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At optimizer-step boundaries only: a checkpoint never holds half-accumulated gradients."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        signum = self._agreed(pl_module.device)
        if signum is None:
            return
        checkpoint = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoint))
        checkpoint.save_now(trainer)
        self.stopped_by = signum
        trainer.should_stop = True


def stop_signal(trainer: L.Trainer) -> Optional[int]:
    """The signal that stopped this run after its save (None: it ran to the end)."""
    return next((c.stopped_by for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)


def requeue_job(trainer: L.Trainer) -> None:
    """``scontrol requeue`` from rank 0 if SIGUSR1 stopped this run under Slurm."""
    if trainer.is_global_zero and stop_signal(trainer) == signal.SIGUSR1:
        job = os.environ["SLURM_JOB_ID"]
        print(f"SIGUSR1: saved step {trainer.global_step}; requeueing job {job}", flush=True)
        subprocess.run(["scontrol", "requeue", job], check=True)
