"""``trainer.strategy``: ``auto`` and ``ddp`` as Lightning has them; ``fsdp`` as FSDP2 over every rank with
atomic distributed checkpoints that resume on another world size."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from biodino.checkpoint import dcp
from biodino.fs.atomic import DiskFullError, fsync_dir, is_disk_full, temporary_name
from biodino.checkpoint.integrity import write_sums


def build_strategy(name: str) -> Union[str, Strategy]:
    """``name`` is one of ``config.STRATEGIES`` (checked with the config)."""
    return ShardedStrategy() if name == "fsdp" else name


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's FSDP2 strategy with one data-parallel dimension over all ranks (no tensor parallelism).

    A checkpoint is a DCP directory written under a hidden temporary name and renamed when every rank has
    finished, so a kill leaves the previous checkpoints intact. Loading reshards to the current world size
    and reads no pickled code (``biodino.checkpoint.dcp``).
    """

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = temporary_name(path)
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("checkpoint_tmp_clean")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except BaseException as err:  # DCP raises CheckpointException (a BaseException) on every rank for any error
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(err, path.parent):
                raise DiskFullError(path) from None
            raise
        self.barrier("checkpoint_written")
        failure = self.broadcast(self._finish_on_rank_zero(tmp, path))  # every rank learns how rank 0 fared
        if failure == "disk full":
            raise DiskFullError(path)
        if failure:
            raise RuntimeError(f"finishing checkpoint {path} failed on rank 0: {failure}")

    def _finish_on_rank_zero(self, tmp: Path, path: Path) -> Optional[str]:
        """Checksums, then the rename into place; on failure the partial directory is removed and the reason
        returned (raising here would leave the other ranks waiting in the next collective)."""
        if not self.is_global_zero:
            return None
        try:
            write_sums(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            return "disk full" if is_disk_full(err, path.parent) else f"{type(err).__name__}: {err}"
        return None

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not dcp.is_dcp(path):
            raise ValueError(f"{path}: trainer.strategy=fsdp resumes from distributed checkpoint directories only")
        return dcp.load_into(path, self.model, self.optimizers)
