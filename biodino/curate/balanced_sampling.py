"""Cluster-balanced sampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning"): given the
hierarchical k-means clusters of the kept embeddings (``kmeans.hierarchy``), a budget is split evenly over the
top-level clusters, each share evenly over its children, down to the finest clusters, where images are drawn at
random. A cluster smaller than its share gives all it has and the rest goes to its siblings, so rare concepts
are kept whole and over-represented ones thinned."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def default_levels(n: int) -> list[int]:
    """Cluster counts, finest first: about 50 images per finest cluster and 20 finest clusters per parent (the
    walkthrough's 60k/1.2k/120 for a few million images), stopping at fewer than 2 parents."""
    levels = [max(2, n // 50)]
    while levels[-1] // 20 >= 2:
        levels.append(levels[-1] // 20)
    return levels


def fitted_levels(levels: Optional[Sequence[int]], n: int) -> list[int]:
    """The requested cluster counts (or ``default_levels``), each at most ``n`` and strictly decreasing."""
    out: list[int] = []
    for k in (levels or default_levels(n)):
        k = max(1, min(k, n, out[-1] - 1 if out else n))
        if not out or k < out[-1]:
            out.append(k)
    return out or [1]


def allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Water-filling: the most even split of ``budget`` over bins holding ``sizes`` items, no bin over its size.
    Bins are filled smallest first, each with its size or an equal share of what is left, whichever is less (so
    the rounding remainder lands in the larger bins); what full bins could not take goes to the bins with room."""
    take = np.zeros(len(sizes), np.int64)
    remaining, left = min(budget, int(sizes.sum())), len(sizes)
    for i in np.argsort(sizes, kind="stable"):
        take[i] = min(int(sizes[i]), remaining // left)
        remaining -= take[i]
        left -= 1
    for i in np.argsort(-sizes, kind="stable"):
        if remaining == 0:
            break
        extra = min(remaining, int(sizes[i] - take[i]))
        take[i] += extra
        remaining -= extra
    return take


def balanced_sample(assignments: list[np.ndarray], budget: int, seed: int) -> np.ndarray:
    """Row indices of a ``budget``-sized sample, balanced top-down over the hierarchy (finest level first in
    ``assignments``), sorted in input order."""
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []

    def descend(rows: np.ndarray, level: int, quota: int) -> None:
        if level < 0:
            chosen.append(rng.choice(rows, size=quota, replace=False))
            return
        labels = assignments[level][rows]
        _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        for j, share in enumerate(allocate(sizes, quota)):
            if share:
                descend(rows[inverse == j], level - 1, int(share))

    rows = np.arange(len(assignments[0]))
    descend(rows, len(assignments) - 1, min(budget, len(rows)))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)
