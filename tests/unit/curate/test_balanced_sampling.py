"""Water-filling allocation and hierarchical balanced sampling against hand-computed splits."""

from __future__ import annotations

import numpy as np
import pytest

from biodino.curate import balanced_sampling as bs


@pytest.mark.parametrize("sizes,budget,expected", [
    ([1, 5, 10], 9, [1, 4, 4]),  # the small bin gives all; the rest split evenly
    ([2, 2, 2], 7, [2, 2, 2]),  # more budget than items: everything
    ([10, 10, 10], 10, [3, 3, 4]),  # the remainder of 10 / 3 goes to the bin filled last
    ([3, 100, 40], 60, [3, 29, 28]),  # 3, then (57 // 2 = 28) each, the remainder to the largest
])
def test_allocate(sizes, budget, expected) -> None:
    assert bs.allocate(np.array(sizes), budget).tolist() == expected


def test_balanced_sample_splits_top_down() -> None:
    # top level: A (finest clusters a1: 30, a2: 2) and B (b1: 4); budget 12 -> A 8, B 4 (all of B);
    # within A: a2 gives its 2, a1 the other 6
    finest = np.array([0] * 30 + [1] * 2 + [2] * 4)
    top = np.array([0] * 32 + [1] * 4)
    chosen = bs.balanced_sample([finest, top], 12, seed=0)
    assert len(chosen) == 12 and len(set(chosen.tolist())) == 12 and np.all(np.diff(chosen) > 0)
    assert np.bincount(finest[chosen], minlength=3).tolist() == [6, 2, 4]


def test_default_and_fitted_levels() -> None:
    assert bs.default_levels(3_000_000) == [60_000, 3_000, 150, 7]
    assert bs.default_levels(40) == [2]
    assert bs.fitted_levels([8, 4], 5) == [5, 4]  # at most the rows, still strictly decreasing
    assert bs.fitted_levels([8, 7, 6], 3) == [3, 2, 1]
    assert bs.fitted_levels(None, 1000) == [20]
