"""Chunked exact k-NN against a brute-force numpy search, across chunk and slice boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biodino.curate import neighbours


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch) -> None:
    monkeypatch.setattr(neighbours, "QUERY_CHUNK", 7)
    monkeypatch.setattr(neighbours, "BASE_SLICE", 11)


def test_top_k_equals_brute_force() -> None:
    queries, base = _unit(20, 8, 0), _unit(50, 8, 1)
    sims, idx = neighbours.top_k(queries, base, 5, torch.device("cpu"))
    full = queries @ base.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :5]
    assert np.array_equal(idx, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(full, expected, 1), atol=1e-6)


def test_a_row_is_never_its_own_neighbour_and_short_rows_pad() -> None:
    base = _unit(30, 6, 2)
    base[12] = base[3]  # an exact copy: found, at similarity 1
    start = 10
    sims, idx = neighbours.top_k(base[start:start + 9], base, 40, torch.device("cpu"), self_offset=start)
    for q in range(9):
        row = start + q
        full = base @ base[row]
        full[row] = -np.inf
        np.testing.assert_allclose(sims[q, :29], np.sort(full)[::-1][:29], atol=1e-6)  # ties may swap indices
        np.testing.assert_allclose(full[idx[q, :29]], sims[q, :29], atol=1e-6)
        assert sorted(idx[q, :29].tolist()) == sorted(set(range(30)) - {row})
        assert idx[q, 29:].tolist() == [-1] * 11 and np.isneginf(sims[q, 29:]).all()  # 29 others only
    assert idx[2, 0] == 3 and sims[2, 0] == pytest.approx(1.0, abs=1e-6)
