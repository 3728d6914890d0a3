"""Hierarchical k-means with resampling (Vo et al. 2024) over a pool too large for one process. pt-kmeans does
the k-means itself (k-means++ seeding, distances, the levels above the finest, the resampled refits) but runs in
one process; the finest level, over every kept image, is the costly one, so its Lloyd iterations and the
resampling's reassignments run here on torch.distributed: each rank reads only its block of rows from the
memory-mapped pool, and per-cluster sums, counts and nearest-row candidates are reduced across ranks.

With one rank this is pt-kmeans' own ``hierarchical_kmeans(method="resampled")`` step by step (same seeding,
update, stopping rule and refits: tested equal to it), except that a cluster left empty keeps its previous centre
instead of a random row (the same on every rank, so the ranks never disagree).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from biodino.distributed.process_group import World

DISTANCE_CELLS = 1 << 28  # (rows x clusters) of one distance block: 1 GiB in float32
SEED_SAMPLE = 256  # rows per cluster drawn for the k-means++ seeding of the finest level
MAX_ITERS, TOL = 100, 1e-4  # pt-kmeans' defaults


def _block(n: int, world: World) -> slice:
    return slice(n * world.rank // world.size, n * (world.rank + 1) // world.size)


def _rows_of(embeddings: np.ndarray, rows: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``embeddings[rows]`` in that order, read from the memmap (a contiguous block reads as one slice)."""
    contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1)
    block = embeddings[rows[0]:rows[-1] + 1] if contiguous else embeddings[rows]
    return torch.from_numpy(np.array(block, np.float32)).to(dtype)


def _reduce(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum over the ranks (on the CPU: the job's group is gloo)."""
    if world.size == 1:
        return t
    out = t.cpu()
    dist.all_reduce(out)
    return out.to(t.device)


def _broadcast(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return t
    out = t.cpu().contiguous()
    dist.broadcast(out, 0)
    return out.to(t.device)


def _assign(x: torch.Tensor, centres: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre (cosine) of every row and the distance to it, in blocks of rows."""
    from pt_kmeans import compute_distance

    chunk = max(1024, DISTANCE_CELLS // len(centres))
    labels, dists = [], []
    for start in range(0, len(x), chunk):
        d = compute_distance(x[start:start + chunk].to(device), centres, "cosine", x_pre_normalized=True)
        best = d.min(dim=1)
        labels.append(best.indices.cpu())
        dists.append(best.values.float().cpu())
    empty = torch.empty(0)
    return (torch.cat(labels) if labels else empty.long()), (torch.cat(dists) if dists else empty)


def _lloyd(x: torch.Tensor, centres: torch.Tensor, world: World, device: torch.device) -> torch.Tensor:
    """pt-kmeans' Lloyd iterations (mean update, relative centre shift below TOL stops), sums over all ranks."""
    k = len(centres)
    for _ in range(MAX_ITERS):
        labels, _ = _assign(x, centres, device)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float32).index_add_(0, labels, x.float())
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        sums, counts = _reduce(sums, world), _reduce(counts, world)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].float(), centres.float().cpu())
        shift = torch.norm(new - centres.float().cpu()) / torch.norm(centres.float().cpu()).clamp_min(1e-7)
        centres = new.to(device=device, dtype=x.dtype)
        if shift < TOL:
            break
    return centres


def _nearest(labels: np.ndarray, dists: np.ndarray, rows: np.ndarray, k: int, s: int) -> np.ndarray:
    """Per cluster, the (at most) ``s`` of ``rows`` nearest its centre, as (row, cluster, distance) records,
    ordered by cluster then distance (ties: the earlier row), as pt-kmeans' stable choice."""
    order = np.lexsort((rows, dists, labels))
    lab = labels[order]
    rank_in = np.arange(len(order)) - np.searchsorted(lab, np.arange(k))[lab]
    keep = order[rank_in < s]
    return np.rec.fromarrays([rows[keep], labels[keep], dists[keep]], names="row,cluster,dist")


def _gather(values: np.ndarray, world: World) -> np.ndarray:
    """Every rank's array, concatenated in rank order (numpy arrays through gloo: no pickled code is loaded
    from files, only exchanged between the job's own processes)."""
    if world.size == 1:
        return values
    out: list = [None] * world.size
    dist.all_gather_object(out, values)
    return np.concatenate(out)


def finest_level(embeddings: np.ndarray, rows: np.ndarray, k: int, samples: int, resamples: int, seed: int,
                 world: World, device: torch.device) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """Centres of the finest level over ``embeddings[rows]`` (``rows`` ascending) and, on rank 0, every row's
    cluster. Seeding: k-means++ on all rows when they are at most SEED_SAMPLE per cluster, else on that many drawn
    at random (on rank 0, then broadcast)."""
    from pt_kmeans import initialize_centers, kmeans

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    mine = rows[_block(len(rows), world)]
    x = _rows_of(embeddings, mine, dtype)
    shape = (k, embeddings.shape[1])
    centres = torch.empty(shape, dtype=dtype)
    if world.rank == 0:
        pick = np.arange(len(rows)) if len(rows) <= SEED_SAMPLE * k else np.sort(
            np.random.default_rng(seed).choice(len(rows), SEED_SAMPLE * k, replace=False))
        generator = torch.Generator(device=device).manual_seed(seed)
        centres = initialize_centers(_rows_of(embeddings, rows[pick], dtype), k, "kmeans++", "cosine",
                                     x_pre_normalized=True, generator=generator, device=device).to(dtype)
    centres = _lloyd(x, _broadcast(centres, world).to(device), world, device)
    labels, dists = _assign(x, centres, device)
    for _ in range(resamples if samples > 0 else 0):
        near = _gather(_nearest(labels.numpy(), dists.numpy(), mine, k, samples), world)
        centres = torch.empty(shape, dtype=dtype)
        if world.rank == 0:  # the nearest ``samples`` of every cluster over all ranks, refitted by pt-kmeans
            chosen = _nearest(near["cluster"], near["dist"], near["row"], k, samples)["row"]
            centres, _ = kmeans(_rows_of(embeddings, chosen, dtype), k, distance_metric="cosine", random_seed=seed,
                                device=device, x_pre_normalized=True, aggregation_dtype=torch.float32)
        centres = _broadcast(centres.to(dtype), world).to(device)
        labels, dists = _assign(x, centres, device)
    every = _gather(labels.numpy(), world)  # blocks in rank order: the rows' order
    return centres, (every if world.rank == 0 else None)


def hierarchy(embeddings: np.ndarray, rows: np.ndarray, levels: list[int], resamples: int, seed: int,
              world: World, device: torch.device) -> Optional[list[np.ndarray]]:
    """Per level (finest first), the cluster of every row of ``embeddings[rows]``, on rank 0 (None elsewhere)."""
    from pt_kmeans import hierarchical_kmeans

    counts = [len(rows), *levels[:-1]]
    samples = [max(1, c // k // 2) for c, k in zip(counts, levels)]
    centres, finest = finest_level(embeddings, rows, levels[0], samples[0], resamples, seed, world, device)
    if world.rank != 0:
        return None
    out = [finest.astype(np.int64)]
    if len(levels) > 1:
        above = hierarchical_kmeans(centres.float().cpu(), levels[1:], distance_metric="cosine", random_seed=seed,
                                    device=device, method="resampled" if resamples else "centers",
                                    n_samples=samples[1:], n_resamples=max(resamples, 1),
                                    aggregation_dtype=torch.float32)
        out += [r["assignment"].numpy().astype(np.int64)[out[0]] for r in above]
    return out
