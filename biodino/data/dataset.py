"""Training batches from tar shards: batch ``m`` of a rank is a pure function of (seed, rank, m)."""

from __future__ import annotations

import logging
import random
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from biodino.data.collate import collate_crops
from biodino.data.multicrop import MultiCrop
from biodino.data.shard_index import Shard
from biodino.data.stream import BATCH_MASKS, SAMPLE_AUGMENT, SampleStream, derived_seed
from biodino.data.tar_reader import TarShard
from biodino.data.masking import MaskSampler, masked_positions
from biodino.config.schema import TrainConfig

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SUBSTITUTE_STRIDE = 7919  # a corrupt sample at p is replaced by the first good one at p + k * stride
MAX_SUBSTITUTES = 64


class CorruptSample(Exception):
    pass


class MultiCropBatches(IterableDataset):
    """Infinite batches of one rank; worker ``i`` of ``W`` yields batches start + i, start + i + W, ...

    so the DataLoader's round-robin order is the rank's batch order whatever the number of workers.
    ``start`` is the number of batches the rank has consumed (set before each iteration, to resume and at epochs).
    """

    def __init__(self, shards: list[Shard], cfg: TrainConfig, mask_sampler: MaskSampler, rank: int = 0) -> None:
        self.shards, self.cfg, self.rank = shards, cfg, rank
        self.mask_sampler = mask_sampler
        self.multicrop = MultiCrop(cfg.crops)
        self.stream = SampleStream(shards, cfg.seed, rank, cfg.data.shards_per_block)
        self._start = torch.zeros((), dtype=torch.long).share_memory_()  # seen by persistent workers too
        self._open = lru_cache(maxsize=64)(lambda i: TarShard(self.shards[i].path))

    @property
    def start(self) -> int:
        return int(self._start)

    @start.setter
    def start(self, position: int) -> None:
        """Set before each iteration by the loader; in shared memory, so persistent workers, which keep their copy
        of the dataset across epochs, start their next iteration there too."""
        self._start.fill_(position)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        m = self.start + worker
        while True:
            yield self.batch(m)
            m += workers

    def batch(self, m: int) -> dict[str, torch.Tensor]:
        size = self.cfg.schedule.batch_size
        corrupt = 0
        samples = []
        for p in range(m * size, (m + 1) * size):
            sample, skipped = self._sample(p)
            samples.append(sample)
            corrupt += skipped
        rng = random.Random(derived_seed(self.cfg.seed, self.rank, BATCH_MASKS, m))
        batch = collate_crops(samples)
        n_crops = batch["global_crops"].shape[0]
        batch["masks"] = self.mask_sampler(n_crops, rng)
        batch["mask_indices"], batch["mask_weights"] = masked_positions(batch["masks"],
                                                                        self.mask_sampler.capacity(n_crops))
        batch["batch_index"] = m  # ints, not tensors: read on the host, never copied to the device
        batch["corrupt"] = corrupt
        return batch

    def _sample(self, position: int) -> tuple[dict[str, list[torch.Tensor]], int]:
        """Crops of the sample at ``position``, or of its first good substitute; and how many were skipped."""
        for k in range(MAX_SUBSTITUTES):
            p = position + k * SUBSTITUTE_STRIDE
            try:
                data = self._image_bytes(*self.stream.locate(p))
                rng = np.random.default_rng([self.cfg.seed, self.rank, SAMPLE_AUGMENT, p])
                return self.multicrop(data, rng), k
            except (CorruptSample, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as err:
                log.warning("skipping corrupt sample at stream position %d: %s", p, err)
        raise RuntimeError(f"{MAX_SUBSTITUTES} consecutive corrupt samples from position {position}; "
                           "check the shards listed in the index")

    def _image_bytes(self, shard_id: int, index: int) -> bytes:
        shard = self._open(shard_id)
        if index >= len(shard):
            raise CorruptSample(f"{shard.path}: sample {index} missing (truncated shard)")
        data = shard.read(index, IMAGE_EXTS)
        if data is None:
            raise CorruptSample(f"{shard.path}: sample {index} has no image ({', '.join(shard.samples[index])})")
        return data  # undecodable bytes raise when the crops are made, and are skipped there
