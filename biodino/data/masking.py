"""iBOT masks, drawn on the CPU side: per-batch stratified mask ratios and block masking."""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

import torch

MaskGenerator = Callable[[int, random.Random], torch.Tensor]


class BlockMasking:
    """Masks ``n`` patches of an (h, w) grid as rectangles (BEiT/DINOv2 block masking).

    Each rectangle covers at least ``min_patches`` patches, at most ``max_patches`` (default half the
    grid), with aspect ratio log-uniform in [min_aspect, 1 / min_aspect]; rectangles are added until the
    target count is reached or no rectangle fits in 10 tries (so the count can fall short, never exceed).
    """

    def __init__(self, grid: tuple[int, int], min_patches: int = 4, max_patches: Optional[int] = None,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_patches = min_patches
        self.max_patches = max_patches if max_patches is not None else int(0.5 * self.num_patches)
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, n: int, rng: random.Random) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < n:
            added = self._add_block(mask, min(n - count, self.max_patches), rng)
            if added == 0:
                break
            count += added
        return mask.flatten()

    def _add_block(self, mask: torch.Tensor, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window.fill_(True)
                    return new
        return 0


class MaskSampler:
    """Masks for a batch of global crops: a ``probability`` share of them is masked, with ratios drawn
    one per stratified bin of ``linspace(ratio_min, ratio_max)`` and shuffled over the batch (DINOv2)."""

    def __init__(self, generator: MaskGenerator, num_patches: int, probability: float = 0.5,
                 ratio_min: float = 0.1, ratio_max: float = 0.5) -> None:
        if not 0.0 <= ratio_min <= ratio_max <= 1.0:
            raise ValueError(f"mask ratios must satisfy 0 <= min <= max <= 1, got ({ratio_min}, {ratio_max})")
        self.generator = generator
        self.num_patches = num_patches
        self.probability = probability
        self.ratios = (ratio_min, ratio_max)

    def _edges(self, n_masked: int) -> list[float]:
        lo, hi = self.ratios
        return [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else []

    def capacity(self, n_crops: int) -> int:
        """The most patches the masks of ``n_crops`` crops can hold: each masked crop's bin's upper ratio. A fixed
        bound, so the masked-token buffers keep one shape for the whole run (no recompiles, no syncs)."""
        n_masked = int(n_crops * self.probability)
        edges = self._edges(n_masked)
        return sum(int(self.num_patches * edges[i + 1]) for i in range(n_masked))

    def __call__(self, n_crops: int, rng: random.Random) -> torch.Tensor:
        """(n_crops, num_patches) bool."""
        n_masked = int(n_crops * self.probability)
        edges = self._edges(n_masked)
        masks = [self.generator(int(self.num_patches * rng.uniform(edges[i], edges[i + 1])), rng)
                 for i in range(n_masked)]
        masks += [torch.zeros(self.num_patches, dtype=torch.bool) for _ in range(n_crops - n_masked)]
        rng.shuffle(masks)
        return torch.stack(masks)


class CyclicMasking:
    """Franca's inverse-roll mask: masks everything outside one visible block of N - n patches that is
    cyclically shifted (it may wrap around the edges), so exactly ``n`` patches are masked.

    The visible block is the first N - n cells, row-major, of an h x w rectangle (aspect ratio h / w
    log-uniform in [min_aspect, max_aspect], clamped to the grid) with h * w >= N - n: full rows plus
    one left-aligned partial last row. The random draws follow birder's FrancaInverseRollBlockMasking
    (aspect, top, left, row shift, column shift) so a seeded generator reproduces its masks.
    """

    def __init__(self, grid: tuple[int, int], min_aspect: float = 0.3, max_aspect: Optional[float] = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, n: int, rng: random.Random) -> torch.Tensor:
        if not 0 <= n <= self.num_patches:
            raise ValueError(f"cannot mask {n} of {self.num_patches} patches")
        if n in (0, self.num_patches):
            return torch.full((self.num_patches,), n > 0, dtype=torch.bool)
        visible = self.num_patches - n
        h, w = self._block_shape(visible, rng)
        # top/left are redundant with the shift but are drawn to keep birder's random stream.
        top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
        dy, dx = rng.randint(0, self.height - 1), rng.randint(0, self.width - 1)
        i = torch.arange(visible)
        rows = (top + dy + i // w) % self.height
        cols = (left + dx + i % w) % self.width
        mask = torch.ones(self.height, self.width, dtype=torch.bool)
        mask[rows, cols] = False
        return mask.flatten()

    def _block_shape(self, visible: int, rng: random.Random) -> tuple[int, int]:
        """(h, w) of a rectangle holding at least ``visible`` cells, aspect clamped so it fits the grid."""
        grid_lo = math.log(visible / self.width**2)
        grid_hi = math.log(self.height**2 / (visible + 1e-5))
        lo, hi = max(self.log_aspect[0], grid_lo), min(self.log_aspect[1], grid_hi)
        if lo <= hi:
            aspect = math.exp(rng.uniform(lo, hi))
        else:  # the requested range misses the grid's: take the nearest feasible aspect
            aspect = math.exp(grid_hi if self.log_aspect[0] > grid_hi else grid_lo)
        h = min(self.height, math.ceil(math.sqrt(visible * aspect)))
        w = min(self.width, max(math.ceil(math.sqrt(visible / aspect)), -(-visible // h)))
        return min(self.height, max(h, -(-visible // w))), w


def masked_positions(masks: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the masked patches of (n, N) ``masks`` are, as flat indices into (n * N) patch tokens padded to
    ``capacity`` (raised to the count if the masks hold more), and each one's iBOT weight: 1 / (masked patches of
    its image), 0 for the padding. Built on the CPU with the batch, so the device gathers a fixed number of tokens
    with ``index_select`` instead of boolean indexing, which would wait for the device to count them."""
    flat = masks.flatten().nonzero().squeeze(1)
    per_image = masks.sum(dim=1, dtype=torch.float32).clamp_min(1.0).reciprocal()
    size = max(capacity, flat.numel())
    indices = torch.zeros(size, dtype=torch.long)
    weights = torch.zeros(size, dtype=torch.float32)
    indices[: flat.numel()] = flat
    weights[: flat.numel()] = per_image[flat // masks.shape[1]]
    return indices, weights
