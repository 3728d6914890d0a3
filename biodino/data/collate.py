"""Collating multi-crop samples: crops stacked crop-major per size group, iBOT masks drawn here (CPU)."""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from biodino.ssl.masking import MaskSampler


class MultiCropCollate:
    """Samples ``{"global_crops": [...], "local_crops": [...]}`` -> batch of crop-major tensors and masks.

    Masks come from a ``random.Random`` seeded by ``torch.initial_seed()`` of the process, which the
    DataLoader sets per worker, so each worker draws its own reproducible mask stream.
    """

    def __init__(self, mask_sampler: MaskSampler) -> None:
        self.mask_sampler = mask_sampler
        self._rng: Optional[random.Random] = None
        self._seed: Optional[int] = None

    def _rng_for_process(self) -> random.Random:
        seed = torch.initial_seed()
        if self._rng is None or seed != self._seed:
            self._rng, self._seed = random.Random(seed), seed
        return self._rng

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
        global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
        batch = {"global_crops": global_crops,
                 "masks": self.mask_sampler(global_crops.shape[0], self._rng_for_process())}
        if n_local:
            batch["local_crops"] = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
        else:
            batch["local_crops"] = global_crops.new_empty((0, *global_crops.shape[1:]))
        return batch
