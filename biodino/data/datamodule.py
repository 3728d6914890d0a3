"""The training DataModule: shards resolved and checked at setup, one resumable batch stream per rank."""

from __future__ import annotations

import signal
from typing import Any, Callable, Iterator

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from biodino.data.dataset import MultiCropBatches
from biodino.data.shard_index import Shard, resolve_shards
from biodino.models import preset_config
from biodino.config.schema import TrainConfig
from biodino.data.masking import BlockMasking, MaskSampler

MaskShape = Callable[[tuple[int, int]], Callable]  # a mask generator class taking the patch grid


def mask_sampler(cfg: TrainConfig, shape: MaskShape = BlockMasking) -> MaskSampler:
    """iBOT masks on the global-crop patch grid, of the objective's ``shape`` (DINOv2's blocks by default)."""
    side = cfg.crops.global_size // preset_config(cfg.model.preset).patch_size
    ibot = cfg.objective.ibot
    aspect = {} if ibot.mask_aspect is None else {"min_aspect": ibot.mask_aspect[0], "max_aspect": ibot.mask_aspect[1]}
    return MaskSampler(shape((side, side), **aspect), side * side, ibot.mask_sample_probability,
                       ibot.mask_ratio_min, ibot.mask_ratio_max)


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM, SIGINT and SIGUSR1 to the trainer process, which saves at the next step and
    then ends them: a signal sent to the whole process group (Slurm, Ctrl-C) must not kill a worker mid-epoch."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class ResumingLoader(DataLoader):
    """A DataLoader whose every iteration starts the stream where the run is (``position()`` batches in)."""

    def __init__(self, dataset: MultiCropBatches, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.position = position

    def __iter__(self) -> Iterator[Any]:
        self.dataset.start = self.position()
        return super().__iter__()


class ShardDataModule(L.LightningDataModule):
    """Batches of multi-crop uint8 crops and iBOT masks from the shards named by ``data.shards``."""

    def __init__(self, cfg: TrainConfig, mask_shape: MaskShape = BlockMasking) -> None:
        super().__init__()
        self.cfg, self.mask_shape = cfg, mask_shape  # the objective says which masks it learns from
        self.shards: list[Shard] = []

    def setup(self, stage: str) -> None:
        self.shards = resolve_shards(self.cfg.data.shards)
        streams = self._world_size() * max(self.cfg.data.num_workers, 1)
        if len(self.shards) < streams:
            rank_zero_info(f"{len(self.shards)} shards for {streams} reader streams (ranks x workers): "
                           "streams resample shards, so some shards are read by several streams")

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def consumed_batches(self) -> int:
        """Batches this rank has consumed: optimizer steps times accumulation (0 before training)."""
        if self.trainer is None:
            return 0
        return self.trainer.global_step * self.trainer.accumulate_grad_batches

    def train_dataloader(self) -> ResumingLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        dataset = MultiCropBatches(self.shards, self.cfg, mask_sampler(self.cfg, self.mask_shape), rank)
        workers = self.cfg.data.num_workers
        return ResumingLoader(dataset, self.consumed_batches, num_workers=workers,
                              pin_memory=self.cfg.data.pin_memory, persistent_workers=workers > 0,
                              worker_init_fn=ignore_stop_signals,
                              prefetch_factor=4 if workers else None)
