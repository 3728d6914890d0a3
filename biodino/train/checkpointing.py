"""Lightning's checkpointing, every N optimizer steps and at every epoch end, keeping the newest K."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepAndEpochCheckpoint(ModelCheckpoint):
    """``step=NNNNNNN.ckpt`` every ``every_n_steps`` and at epoch ends; the ``keep_last`` newest kept;
    ``last.ckpt`` links the newest. Lightning writes each file atomically (temporary file, then rename)."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int) -> None:
        super().__init__(dirpath=dirpath, filename="step={step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep_last, every_n_train_steps=every_n_steps,
                         save_last="link", enable_version_counter=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning allows steps or epochs, not both: add the epoch-end save (skipped if this step is saved)."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
