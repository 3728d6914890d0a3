"""Lightning's checkpointing at optimizer-step boundaries (every N steps, at every epoch's last step, on a signal),
keeping the newest K, each written atomically with a SHA-256 checksum, and verified before a resume.

Every save happens at the end of an optimizer step, never from ``on_train_epoch_end``: Lightning restores an
epoch-end save as a finished epoch and then counts it again, so a resumed run would stop an epoch early.
A checksum is kept because ``torch.load`` does not notice damaged bytes: a ``.ckpt`` file has its
``NAME.sha256`` beside it, a sharded checkpoint directory a ``SHA256SUMS`` inside (both ``sha256sum -c`` format).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from biodino.train.atomic import HashingWriter, atomic_write, atomic_write_text, sha256_of
from biodino.train.run_dir import RunDir
from biodino.train.safe_load import CheckpointError, load_torch

SUMS_FILE = "SHA256SUMS"  # inside a sharded checkpoint directory


def sidecar(path: Path) -> Path:
    """The checksum file of a single-file checkpoint."""
    return path.with_name(path.name + ".sha256")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``.NAME.tmp`` beside the target, fsyncs, renames (Lightning's default stages the file in the system
    temp directory and moves it: a copy, not atomic, when that is another filesystem, as on most clusters).
    The checksum is computed while writing and its file renamed into place just before the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        digest: list[str] = []

        def write(f) -> None:
            hashing = HashingWriter(f)
            torch.save(checkpoint, hashing)
            digest.append(hashing.sha256.hexdigest())

        atomic_write(path, write, lambda: atomic_write_text(sidecar(path), f"{digest[0]}  {path.name}\n"))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar(Path(path)).unlink(missing_ok=True)


def write_sums(directory: Path) -> None:
    """``SHA256SUMS`` of every file in a sharded checkpoint directory (written before it is renamed into place)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    lines = [f"{sha256_of(p)}  {p.relative_to(directory)}\n" for p in files]
    atomic_write_text(directory / SUMS_FILE, "".join(lines))


def _check_sums(sums: Path, root: Path) -> None:
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        target = root / name
        if not target.is_file():
            raise CheckpointError(f"{target} is missing")
        if sha256_of(target) != digest:
            raise CheckpointError(f"{target} does not match its checksum (damaged or truncated)")


def verify(path: Path) -> None:
    """Raise CheckpointError naming what is wrong with a checkpoint file or directory. With a checksum, every byte
    is checked; a checkpoint written without one (older biodino) must at least load."""
    if path.is_dir():
        if (path / SUMS_FILE).is_file():
            return _check_sums(path / SUMS_FILE, path)
        from biodino.train import dcp

        dcp.SafeReader(path).read_metadata()
        load_torch(path / dcp.META_FILE)
        return
    if sidecar(path).is_file():
        return _check_sums(sidecar(path), path.parent)
    load_torch(path)


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


def remove_partial(checkpoints: Path) -> None:
    """Temporary files and directories of interrupted saves, and checksums whose checkpoint never appeared."""
    for tmp in checkpoints.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for sums in checkpoints.glob("*.ckpt.sha256"):
        if not sums.with_suffix("").exists():
            sums.unlink()


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
