"""Cluster-balanced sampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning"):
hierarchical k-means with resampling over the kept embeddings (pt-kmeans, as birder's data-curation walkthrough
uses), then a budget split evenly over the top-level clusters, each share split evenly over its children, down to
the finest clusters, where images are drawn at random. A cluster smaller than its share gives all it has and the
rest goes to its siblings, so rare concepts are kept whole and over-represented ones thinned."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

DISTANCE_CELLS = 1 << 28  # (rows x clusters) of one distance block: 1 GiB in float32


def default_levels(n: int) -> list[int]:
    """Cluster counts, finest first: about 50 images per finest cluster and 20 finest clusters per parent (the
    walkthrough's 60k/1.2k/120 for a few million images), stopping at fewer than 2 parents."""
    levels = [max(2, n // 50)]
    while levels[-1] // 20 >= 2:
        levels.append(levels[-1] // 20)
    return levels


def cluster(embeddings: np.ndarray, levels: list[int], resamples: int, seed: int, device: torch.device,
            cache: Optional[Path] = None) -> list[np.ndarray]:
    """Per level (finest first), every row's cluster, from pt-kmeans' hierarchical k-means on cosine distance with
    ``resamples`` resampling rounds (half of each cluster's mean size drawn nearest its centre). Distances are
    computed in blocks of rows (on a GPU, streamed from host memory); ``cache`` lets a killed run resume at the
    last finished level or round."""
    from pt_kmeans import hierarchical_kmeans

    x = torch.from_numpy(np.asarray(embeddings, dtype=np.float16 if device.type == "cuda" else np.float32))
    counts = [len(x), *levels[:-1]]
    samples = [max(1, c // k // 2) for c, k in zip(counts, levels)]
    chunk = max(1024, DISTANCE_CELLS // levels[0])  # rows per distance block: x stays in host memory, streamed
    results = hierarchical_kmeans(x, levels, distance_metric="cosine", random_seed=seed, device=device,
                                  chunk_size=chunk,
                                  method="resampled", n_samples=samples, n_resamples=resamples,
                                  x_pre_normalized=True, aggregation_dtype=torch.float32,
                                  cache_dir=None if cache is None else str(cache))
    return [r["assignment"].numpy().astype(np.int64) for r in results]


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
