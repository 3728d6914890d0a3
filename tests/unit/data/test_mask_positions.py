"""Masked tokens as a fixed-size index list: the capacity bounds every batch the samplers can draw, the indices
point at exactly the masked patches, the weights are 1 / (masked patches of the image) and 0 for padding."""

from __future__ import annotations

import random

import pytest
import torch

from biodino.data.masking import BlockMasking, CyclicMasking, MaskSampler, masked_positions


@pytest.mark.parametrize("shape", [BlockMasking, CyclicMasking])
@pytest.mark.parametrize("ratios", [(0.1, 0.5), (0.1, 0.65)])
def test_capacity_bounds_every_draw_and_is_close_to_the_mean(shape, ratios) -> None:
    grid, crops = (16, 16), 96  # the Bio-DINO stage-1 global crops of a batch of 48
    sampler = MaskSampler(shape(grid), 256, 0.5, *ratios)
    capacity = sampler.capacity(crops)
    lo, hi = ratios
    edges = [lo + (hi - lo) * i / 48 for i in range(49)]
    assert capacity == sum(int(256 * e) for e in edges[1:])  # the bin tops of the 48 masked crops
    rng = random.Random(0)
    counts = [int(sampler(crops, rng).sum()) for _ in range(50)]
    assert max(counts) <= capacity
    assert sum(counts) / len(counts) > 0.9 * capacity  # little padding: the bins are narrow


def test_indices_and_weights_are_those_of_the_masked_patches() -> None:
    masks = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.4
    masks[2] = False
    indices, weights = masked_positions(masks, 40)
    n = int(masks.sum())
    assert indices.shape == weights.shape == (40,)
    expected = [i * 10 + j for i in range(6) for j in range(10) if masks[i, j]]
    assert indices[:n].tolist() == expected and not weights[n:].any() and not indices[n:].any()
    for k, flat in enumerate(expected):
        assert weights[k] == pytest.approx(1.0 / int(masks[flat // 10].sum()))
    assert masked_positions(masks, 0)[0].shape == (n,)  # a capacity below the count is raised to it
