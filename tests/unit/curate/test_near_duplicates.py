"""Near-duplicate groups from neighbour lists: connected components over the pairs at the threshold (the
expected groups written out by hand), the kept row per group, and the search's resumable blocks."""

from __future__ import annotations

import numpy as np
import torch

from biodino.curate import near_duplicates
from biodino.curate.pool import Pool
from biodino.distributed.process_group import World


def test_groups_are_components_of_the_pairs_at_the_threshold() -> None:
    # 0-1 and 1-2 at 0.97 chain into one group; 3-4 at 0.95 (below 0.96) stays apart; 5-6 meet in one direction
    sims = np.array([[0.97, 0.1], [0.97, 0.97], [0.97, 0.2], [0.95, 0.1], [0.95, 0.1], [0.99, 0.1], [0.5, 0.1]])
    idx = np.array([[1, 3], [0, 2], [1, 5], [4, 0], [3, 0], [6, 0], [0, -1]])
    groups = near_duplicates.group(sims, idx, 0.96)
    members = {tuple(sorted(g.tolist())) for g in groups.duplicate_groups()}
    assert members == {(0, 1, 2), (5, 6)}
    assert groups.kept.tolist() == [True, False, False, True, True, True, False]  # first in input order
    by_size = near_duplicates.group(sims, idx, 0.96, rank=lambda rows: np.array([{6: 5.0}.get(int(r), 1.0)
                                                                                for r in rows]))
    assert by_size.kept.tolist() == [True, False, False, True, True, False, True]  # row 6 scores highest


def test_search_reuses_its_finished_blocks(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    pool = Pool((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16), [str(i) for i in range(50)])
    monkeypatch.setattr(near_duplicates, "BLOCK", 16)
    sims, idx = near_duplicates.search(pool, 3, torch.device("cpu"), tmp_path, World())
    assert len(list(tmp_path.glob("block-*.npz"))) == 4
    full = pool.embeddings.astype(np.float32) @ pool.embeddings.astype(np.float32).T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :3])

    def fail(*args, **kwargs):
        raise AssertionError("a finished block was searched again")
    monkeypatch.setattr(near_duplicates, "top_k", fail)
    again = near_duplicates.search(pool, 3, torch.device("cpu"), tmp_path, World())
    assert np.array_equal(again[1], idx)
