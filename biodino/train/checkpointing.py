"""Lightning's checkpointing, every N optimizer steps and at every epoch end, keeping the newest K,
each file written atomically in place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.NAME.tmp`` beside the target, fsyncs, then ``os.replace``: a kill leaves either the old state
    or the complete new file. (Lightning's default stages the file in the system temp directory and moves
    it, which is a non-atomic copy when that is another filesystem, as on most clusters.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def remove_partial(checkpoints: Path) -> None:
    """Temporary files and directories (sharded saves) of saves that were interrupted."""
    for tmp in checkpoints.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


class StepAndEpochCheckpoint(ModelCheckpoint):
    """``step=NNNNNNN.ckpt`` every ``every_n_steps`` and at epoch ends; the ``keep_last`` newest kept;
    ``last.ckpt`` links the newest. Lightning writes each file atomically (temporary file, then rename)."""

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int) -> None:
        super().__init__(dirpath=dirpath, filename="step={step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep_last, every_n_train_steps=every_n_steps,
                         save_last="link", enable_version_counter=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning allows steps or epochs, not both: add the epoch-end save."""
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save this step's checkpoint (kept and linked like the others) unless it is already saved."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
