"""The distributed hierarchical k-means against pt-kmeans' own ``hierarchical_kmeans(method="resampled")`` (the
same clusters at every level), on planted clusters (recovered exactly), and on 2 gloo ranks (what 1 rank gives)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from biodino.curate import kmeans
from biodino.distributed.process_group import World

CPU = torch.device("cpu")


def _planted(n_per: int = 50, clusters: int = 12, dim: int = 16, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(clusters), n_per)
    x = rng.normal(size=(clusters, dim))[truth] + noise * rng.normal(size=(len(truth), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16), truth


def test_one_rank_is_pt_kmeans_hierarchical_resampled_kmeans() -> None:
    from pt_kmeans import hierarchical_kmeans

    x, _ = _planted(noise=0.6)  # overlapping clusters: the refits move the centres
    rows = np.arange(0, len(x), 1)
    ours = kmeans.hierarchy(x, rows, [12, 3], resamples=2, seed=0, world=World(), device=CPU)
    theirs = hierarchical_kmeans(torch.from_numpy(x.astype(np.float32)), [12, 3], distance_metric="cosine",
                                 random_seed=0, device=CPU, method="resampled", n_samples=[25, 2], n_resamples=2,
                                 x_pre_normalized=True, aggregation_dtype=torch.float32)
    for level, ref in zip(ours, theirs):
        assert np.array_equal(level, ref["assignment"].numpy())


def test_planted_clusters_are_recovered_as_one_tree() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, truth = _planted()
    keep = np.flatnonzero(np.arange(len(x)) % 5 != 0)  # a subset of rows, as after filtering
    finest, top = kmeans.hierarchy(x, keep, [12, 3], resamples=2, seed=0, world=World(), device=CPU)
    assert adjusted_rand_score(truth[keep], finest) == 1.0
    assert all(len(set(top[finest == c].tolist())) == 1 for c in range(12))


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    x, _ = _planted(noise=0.6)
    result = kmeans.hierarchy(x, np.arange(3, len(x)), [12, 3], 2, 0, World(rank, 2), CPU)
    if rank == 0:
        np.save(out, np.stack(result))
    else:
        assert result is None
    dist.destroy_process_group()


def test_two_ranks_give_what_one_rank_gives(tmp_path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "two.npy")), nprocs=2, join=True)
    x, _ = _planted(noise=0.6)
    one = kmeans.hierarchy(x, np.arange(3, len(x)), [12, 3], 2, 0, World(), CPU)
    assert np.array_equal(np.load(tmp_path / "two.npy"), np.stack(one))


@pytest.mark.parametrize("s,expected", [(1, [11, 12, 15]), (3, [11, 14, 12, 10, 13, 15])])
def test_nearest_keeps_the_s_closest_rows_per_cluster(s, expected) -> None:
    labels = np.array([1, 0, 1, 1, 0, 2])
    dists = np.array([0.3, 0.2, 0.1, 0.3, 0.9, 0.5])
    rows = np.array([10, 11, 12, 13, 14, 15])
    near = kmeans._nearest(labels, dists, rows, 3, s)  # by cluster, then distance, then row
    assert near["row"].tolist() == expected
