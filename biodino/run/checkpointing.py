"""Lightning's checkpointing at optimizer-step boundaries (every N steps, at every epoch's last step, on a signal),
keeping the newest K, and the choice of the checkpoint a run resumes from.

Every save happens at the end of an optimizer step, never from ``on_train_epoch_end``: Lightning restores an
epoch-end save as a finished epoch and then counts it again, so a resumed run would stop an epoch early.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from biodino.checkpoint.integrity import verify
from biodino.checkpoint.run_dir import RunDir
from biodino.checkpoint.safe_load import CheckpointError
from biodino.fs.atomic import atomic_write_text

BEST = "best.json"  # {"metric", "value", "step", "checkpoint"}: the kept checkpoint where the metric was highest


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

    def __init__(self, dirpath: Path, every_n_steps: int, keep_last: int, steps_per_epoch: int,
                 best: Optional[tuple[str, Callable[[int], dict[str, float]]]] = None) -> None:
        """``best``: (metric, metrics of a step) to also keep the checkpoint where the metric was highest."""
        super().__init__(dirpath=dirpath, filename="step={step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep_last, every_n_train_steps=every_n_steps,
                         save_last="link", enable_version_counter=False, save_on_train_epoch_end=False)
        self.steps_per_epoch = steps_per_epoch
        self.best_by = best
        self.best_file = Path(dirpath) / BEST
        self.best = json.loads(self.best_file.read_text()) if best and self.best_file.is_file() else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        at_step_end = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if at_step_end and trainer.global_step % self.steps_per_epoch == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the epoch's last step has been saved by ``on_train_batch_end``."""

    def _save_topk_checkpoint(self, trainer: L.Trainer, candidates: dict) -> None:
        super()._save_topk_checkpoint(trainer, candidates)
        if self.best_by is not None:
            self._keep_if_best(trainer)

    def _keep_if_best(self, trainer: L.Trainer) -> None:
        """Record this step's checkpoint in ``best.json`` if its monitored metric is the highest so far; the
        previous best is removed unless it is among the newest kept."""
        metric, metrics_of = self.best_by
        value = metrics_of(trainer.global_step - 1).get(metric)
        path = Path(self.dirpath) / f"step={trainer.global_step:07d}.ckpt"
        if value is None or not path.exists() or (self.best is not None and value <= self.best["value"]):
            return
        previous, self.best = self.best, {"metric": metric, "value": value, "step": trainer.global_step,
                                          "checkpoint": path.name}
        if trainer.is_global_zero:
            atomic_write_text(self.best_file, json.dumps(self.best) + "\n")
        if previous and str(Path(self.dirpath) / previous["checkpoint"]) not in self.best_k_models:
            super()._remove_checkpoint(trainer, str(Path(self.dirpath) / previous["checkpoint"]))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """The best checkpoint is kept besides the newest ``keep_last``."""
        if self.best is None or Path(filepath).name != self.best["checkpoint"]:
            super()._remove_checkpoint(trainer, filepath)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save this step's checkpoint (kept and linked like the others) unless it is already saved."""
        if not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
