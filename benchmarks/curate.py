"""How the time of each ``biodino curate`` step after the embedding grows with the pool size, on synthetic
embeddings: unit vectors around ``N / 50`` random centres (so clusters and near duplicates exist), 64-d by
default. One JSON line per size.

Steps timed, each with the code ``biodino curate`` runs:
- ``pool_build_s``: ``pool.write_pool`` from parts of 1,024 rows (normalize, float16 memmap, keys);
- ``knn_search_s``: ``neighbours.top_k`` of every row against the pool (k 16), the near-duplicate search. It is
  quadratic in N, so above ``--search-queries`` rows the time of that many queries against the whole pool is
  measured and scaled by N / queries (every query block costs the same; ``knn_search_measured_queries`` says
  how many were run);
- ``dedup_group_s``: ``near_duplicates.group`` (connected components over the n x k pairs);
- ``examples_s``: ``examples.nearest_examples`` against 100 example embeddings;
- ``kmeans_s``: ``kmeans.hierarchy`` (one rank), the hierarchical k-means with resampling, at ``--clusters-per``
  images per finest cluster and 20 finest clusters per parent, ``--resamples`` rounds, the finest level's Lloyd
  iterations fixed at ``--iters`` (``kmeans_iter_s`` is one of them: an assignment pass over every row) so that
  sizes compare;
- ``sampling_s``: ``balanced_sampling.balanced_sample`` to ``N / 4``.

    python benchmarks/curate.py --sizes 62500 250000 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from biodino.curate import balanced_sampling, examples, kmeans, near_duplicates
from biodino.curate.neighbours import top_k
from biodino.curate.pool import open_pool, write_pool
from biodino.distributed.process_group import World


def synthetic(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 50, 2), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return x


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(n: int, args: argparse.Namespace, device: torch.device) -> dict:
    raw = synthetic(n, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        keys, blocks = [str(i) for i in range(n)], (raw[i:i + 1024] for i in range(0, n, 1024))
        _, build_s = timed(lambda: write_pool(blocks, keys, args.dim, Path(tmp) / "pool"))
        pool = open_pool(Path(tmp) / "pool")
        emb = np.asarray(pool.embeddings)
        q = min(n, args.search_queries)
        (sims, idx), search_s = timed(lambda: top_k(emb[:q], emb, 16, device, self_offset=0))
        search_s *= n / q
        if q < n:  # the grouping needs every row's neighbours: the measured block's, repeated (same cost)
            reps = -(-n // q)
            sims, idx = np.tile(sims, (reps, 1))[:n], np.tile(idx, (reps, 1))[:n]
        _, group_s = timed(lambda: near_duplicates.group(sims, idx, 0.95))
        ex = emb[np.random.default_rng(1).choice(n, 100, replace=False)]
        _, examples_s = timed(lambda: examples.nearest_examples(emb, ex, device))
        levels = [max(2, n // args.clusters_per)]
        while levels[-1] // 20 >= 2:
            levels.append(levels[-1] // 20)
        kmeans.MAX_ITERS, kmeans.TOL = args.iters, 0.0
        rows = np.arange(n)
        assignments, kmeans_s = timed(lambda: kmeans.hierarchy(emb, rows, levels, args.resamples, 0, World(), device))
        centres = torch.from_numpy(emb[:levels[0]].astype(np.float32))
        _, iter_s = timed(lambda: kmeans._assign(torch.from_numpy(emb.astype(np.float32)), centres, device))
        _, sampling_s = timed(lambda: balanced_sampling.balanced_sample(assignments, n // 4, 0))
    return {"n": n, "dim": args.dim, "device": str(device), "pool_build_s": round(build_s, 3),
            "knn_search_s": round(search_s, 2), "knn_search_measured_queries": q, "dedup_group_s": round(group_s, 3),
            "examples_s": round(examples_s, 3), "kmeans_levels": levels, "resamples": args.resamples,
            "kmeans_s": round(kmeans_s, 2), "kmeans_iters": args.iters, "kmeans_iter_s": round(iter_s, 2), "sampling_s": round(sampling_s, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[62_500, 250_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--search-queries", type=int, default=16_384, help="queries timed in the quadratic search")
    p.add_argument("--clusters-per", type=int, default=500, help="images per finest cluster")
    p.add_argument("--resamples", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="Lloyd iterations of the finest level")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    for n in args.sizes:
        print(json.dumps(measure(n, args, torch.device(args.device))), flush=True)


if __name__ == "__main__":
    main()
