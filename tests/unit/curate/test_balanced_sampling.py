"""Water-filling allocation and hierarchical balanced sampling against hand-computed splits; pt-kmeans'
hierarchy recovering planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_default_levels() -> None:
    assert bs.default_levels(3_000_000) == [60_000, 3_000, 150, 7]
    assert bs.default_levels(40) == [2]


def test_pt_kmeans_hierarchy_recovers_planted_clusters() -> None:
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    truth = np.repeat(np.arange(6), 40)
    x = centres[truth] + 0.05 * rng.normal(size=(240, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    finest, top = bs.cluster(x, [6, 2], resamples=2, seed=0, device=torch.device("cpu"))
    assert adjusted_rand_score(truth, finest) == 1.0
    assert all(len(set(top[finest == c].tolist())) == 1 for c in range(6))  # a tree: one parent per cluster
