"""Near-duplicate removal by embedding: every pool row's ``k`` nearest neighbours (exact, in chunks), the pairs
at cosine similarity >= threshold joined into groups (connected components), one image kept per group.

The search is cut into blocks of query rows, each written atomically once done, and the ranks of a job (Slurm,
torchrun) take every world-size-th block: a kill loses at most the blocks in flight. With ``k`` neighbours per row a
group of many copies stays connected (each copy links to ``k`` others), while the edge count stays n x k."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from biodino.curate.neighbours import top_k
from biodino.curate.pool import Pool
from biodino.distributed.process_group import World
from biodino.fs.atomic import atomic_write

BLOCK = 262144  # query rows per resumable block


@dataclass(frozen=True)
class Groups:
    label: np.ndarray  # (n,) group id per row
    kept: np.ndarray  # (n,) bool: the one row kept per group
    best: np.ndarray  # (n,) similarity to the nearest other row (for the histogram)

    def duplicate_groups(self) -> list[np.ndarray]:
        """Row indices of every group of two or more, largest first."""
        order = np.argsort(self.label, kind="stable")
        bounds = np.flatnonzero(np.diff(self.label[order])) + 1
        groups = [g for g in np.split(order, bounds) if len(g) > 1]
        return sorted(groups, key=len, reverse=True)


def search(pool: Pool, k: int, device: torch.device, parts: Path, world: World) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest other rows, (n, k) similarities and indices; blocks already in ``parts`` are reused."""
    n = len(pool)
    blocks = range(0, n, BLOCK)
    parts.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(blocks):
        path = parts / f"block-{start:012d}-k{k}.npz"
        if i % world.size != world.rank or path.exists():
            continue
        sims, idx = top_k(pool.embeddings[start:start + BLOCK], pool.embeddings, k, device, self_offset=start)
        atomic_write(path, lambda f: np.savez(f, sims=sims, idx=idx))
    world.barrier()
    sims, idx = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for start in blocks:
        with np.load(parts / f"block-{start:012d}-k{k}.npz") as data:
            sims[start:start + BLOCK], idx[start:start + BLOCK] = data["sims"], data["idx"]
    return sims, idx


def group(sims: np.ndarray, idx: np.ndarray, threshold: float,
          rank: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Groups:
    """Connected components of the pairs at similarity >= ``threshold``; the kept row of each group is the first in
    input order, or the one ``rank`` (scores of the given row indices) scores highest, first on ties."""
    n = len(sims)
    rows, cols = np.nonzero((sims >= threshold) & (idx >= 0))
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, idx[rows, cols])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    kept = np.zeros(n, bool)
    if rank is None:
        _, first = np.unique(label, return_index=True)
        kept[first] = True
    else:
        score = np.zeros(n)
        members = np.flatnonzero(np.bincount(label)[label] > 1)  # only rows with a duplicate are ever scored
        score[members] = rank(members)
        order = np.lexsort((np.arange(n), -score, label))  # by group, best score first, then input order
        starts = np.r_[0, np.flatnonzero(np.diff(label[order])) + 1]
        kept[order[starts]] = True
    best = sims[:, 0] if sims.shape[1] else np.full(n, -np.inf, np.float32)
    return Groups(label, kept, best)
