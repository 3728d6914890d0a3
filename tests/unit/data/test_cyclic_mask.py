"""Franca's inverse-roll ("cyclic") mask: exact counts, one wrapped visible block, and parity with birder 0.8.4."""

from __future__ import annotations

import random
from typing import Optional

import numpy as np
import pytest
import torch

from biodino.data.masking import CyclicMasking, MaskSampler


def _block(visible: int, width: int, grid: tuple[int, int]) -> np.ndarray:
    """The first ``visible`` cells, row-major, of a ``width``-wide box at the origin: full rows + a partial row."""
    out = np.zeros(grid, dtype=bool)
    i = np.arange(visible)
    out[i // width, i % width] = True
    return out


def _find_block(mask: torch.Tensor, grid: tuple[int, int]) -> Optional[tuple[int, int, int]]:
    """(row offset, column offset, block width) such that the visible cells are ``_block`` rolled by the
    offsets, or None if they are not one cyclically shifted block."""
    visible = ~mask.view(grid).numpy()
    count = int(visible.sum())
    for dy, dx in zip(*np.nonzero(visible)):  # the block's first cell is visible
        rolled = np.roll(visible, (-dy, -dx), (0, 1))
        width = int(np.argmin(np.append(rolled[0], False)))  # length of the run starting the first row
        if width and -(-count // width) <= grid[0] and np.array_equal(rolled, _block(count, width, grid)):
            return int(dy), int(dx), width
    return None


@pytest.mark.parametrize("grid", [(14, 14), (7, 9), (9, 7), (3, 16)])
def test_masked_count_is_exact_and_visible_cells_are_one_wrapped_block(grid: tuple[int, int]) -> None:
    gen, rng = CyclicMasking(grid), random.Random(0)
    total = grid[0] * grid[1]
    for n in range(total + 1):
        mask = gen(n, rng)
        assert mask.shape == (total,) and mask.dtype == torch.bool
        assert int(mask.sum()) == n
        if 0 < n < total:
            assert _find_block(mask, grid) is not None, f"n={n}: visible cells are not one block"


def test_block_finder_rejects_two_blocks_and_holes() -> None:
    grid = (7, 9)
    mask = torch.ones(grid, dtype=torch.bool)
    mask[1:3, 1:3] = False
    assert _find_block(mask.flatten(), grid) is not None
    mask[5, 6] = False  # a second, detached visible cell
    assert _find_block(mask.flatten(), grid) is None
    mask = torch.ones(grid, dtype=torch.bool)
    mask[1:4, 1:4] = False
    mask[2, 2] = True  # a masked hole inside the visible block
    assert _find_block(mask.flatten(), grid) is None


def test_offsets_and_aspect_ratios_vary_and_blocks_wrap() -> None:
    grid, n = (14, 14), 120  # 76 visible cells
    gen = CyclicMasking(grid)
    found = [_find_block(gen(n, random.Random(seed)), grid) for seed in range(200)]
    assert all(f is not None for f in found)
    offsets = {(dy, dx) for dy, dx, _ in found}
    widths = [w for _, _, w in found]
    rows = [-(-76 // w) for w in widths]
    assert len(offsets) > 100
    assert any(dy + r > 14 for (dy, _, _), r in zip(found, rows))  # wraps top/bottom
    assert any(dx + w > 14 for dy, dx, w in found)  # wraps left/right
    assert min(widths) <= 6 and max(widths) >= 13  # tall and wide blocks (aspect in [0.3, 3.33])
    assert len(set(widths)) >= 6


def test_aspect_range_is_respected_when_not_clamped() -> None:
    grid = (14, 14)
    narrow = CyclicMasking(grid, min_aspect=1.0, max_aspect=1.0)  # square blocks only
    for seed in range(50):
        _, _, w = _find_block(narrow(196 - 49, random.Random(seed)), grid)
        assert w == 7


def test_seeded_generator_is_deterministic() -> None:
    gen = CyclicMasking((7, 9))
    a = [gen(n, random.Random(3)) for n in range(64)]
    b = [gen(n, random.Random(3)) for n in range(64)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(gen(30, random.Random(3)), gen(30, random.Random(4)))


def test_bad_counts_raise() -> None:
    gen = CyclicMasking((7, 9))
    for n in (-1, 64):
        with pytest.raises(ValueError):
            gen(n, random.Random(0))


def test_works_as_the_mask_sampler_generator() -> None:
    grid = (14, 14)
    sampler = MaskSampler(CyclicMasking(grid), num_patches=196, probability=0.5, ratio_min=0.1, ratio_max=0.5)
    masks = sampler(16, random.Random(0))
    counts = sorted(int(c) for c in masks.sum(1))
    assert masks.shape == (16, 196) and counts[:8] == [0] * 8
    for i, c in enumerate(counts[8:]):  # exact counts, so each lands in its stratified bin
        assert 196 * (0.1 + 0.05 * i) - 1 <= c <= 196 * (0.1 + 0.05 * (i + 1))
    assert all(_find_block(m, grid) is not None for m in masks if 0 < m.sum() < 196)


@pytest.mark.parametrize("grid", [(14, 14), (7, 9)])
def test_same_masks_as_birder_franca_under_the_same_seed(grid: tuple[int, int]) -> None:
    ref = pytest.importorskip("birder.scripts.train_franca")
    theirs = ref.FrancaInverseRollBlockMasking(grid, num_masking_patches=0, min_aspect=0.33, max_aspect=3.33)
    ours = CyclicMasking(grid, min_aspect=0.33, max_aspect=3.33)
    state = random.getstate()
    try:
        for seed in range(40):
            rng = random.Random(seed)
            random.seed(seed)  # birder draws from the global generator, in the same order as ours
            for n in range(0, grid[0] * grid[1], 7):
                assert torch.equal(ours(n, rng), theirs._generate(n).flatten()), f"seed {seed}, n={n}"
    finally:
        random.setstate(state)
