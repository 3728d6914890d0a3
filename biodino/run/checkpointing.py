"""Lightning's checkpointing at optimizer-step boundaries (every N steps, at every epoch's last step, on a signal),
keeping the newest K, and the choice of the checkpoint a run resumes from.

Every save happens at the end of an optimizer step, never from ``on_train_epoch_end``: Lightning restores an
epoch-end save as a finished epoch and then counts it again, so a resumed run would stop an epoch early.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from biodino.checkpoint.integrity import verify
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError


def resumable_checkpoint(run: RunDir) -> Optional[Path]:
    """The newest checkpoint that passes ``verify``; each newer one that fails is named in a warning. None when the
    run has none; CheckpointError naming every failure when checkpoints exist but none is usable."""
    failures = []
    for path in run.checkpoints_newest_first():
        try:
            verify(path)
        except CheckpointError as err:
            print(f"warning: skipping checkpoint {path.name}: {err}", file=sys.stderr, flush=True)
            failures.append(str(err))
            continue
        return path
    if failures:
        raise CheckpointError(f"no usable checkpoint in {run.checkpoints}: {'; '.join(failures)}")
    return None


class StepCheckpoint(ModelCheckpoint):
    """``step=NNNNNNN.ckpt`` every ``every_n_steps``, at the last step of every epoch and when ``save_now`` is
    called; the ``keep_last`` newest kept; ``last.ckpt`` links the newest. All at optimizer-step boundaries."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int, steps_per_epoch: int) -> None:
        super().__init__(dirpath=dirpath, filename="step={step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep_last, every_n_train_steps=every_n_steps,
                         save_last="link", enable_version_counter=False, save_on_train_epoch_end=False)
        self.steps_per_epoch = steps_per_epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        at_step_end = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if at_step_end and trainer.global_step % self.steps_per_epoch == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the epoch's last step has been saved by ``on_train_batch_end``."""

    def save_now(self, trainer: L.Trainer) -> None:
        """Save this step's checkpoint (kept and linked like the others) unless it is already saved."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
