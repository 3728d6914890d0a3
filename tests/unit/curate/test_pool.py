"""The pool written from embedding blocks: unit rows in float16, keys alongside, one block in memory at a time."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from biodino.curate.pool import open_pool, write_pool


def test_rows_are_the_normalized_blocks_in_order_in_float16(tmp_path) -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(n, 8)).astype(np.float32) * 5 for n in (3, 1, 4)]
    keys = [f"k{i}" for i in range(8)]
    write_pool(iter(blocks), keys, 8, tmp_path / "pool")
    pool = open_pool(tmp_path / "pool")
    whole = np.concatenate(blocks)
    expected = (whole / np.sqrt((whole.astype(np.float64) ** 2).sum(1, keepdims=True))).astype(np.float16)
    assert pool.embeddings.dtype == np.float16 and pool.embeddings.shape == (8, 8)
    np.testing.assert_array_equal(pool.embeddings, expected)
    assert pool.keys == keys == json.loads((tmp_path / "pool" / "keys.json").read_text())


def test_the_pool_is_never_in_memory_whole(tmp_path) -> None:
    blocks, width = 64, 256  # 64 parts of 1,024 x 256 float32: 64 MiB in all, 1 MiB per part

    def parts():
        for i in range(blocks):
            yield np.full((1024, width), i + 1, np.float32)
    tracemalloc.start()
    write_pool(parts(), [str(i) for i in range(blocks * 1024)], width, tmp_path / "pool")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20  # a quarter of the pool in float32 (the keys' list and JSON are most of it)
    pool = open_pool(tmp_path / "pool")
    np.testing.assert_array_equal(pool.embeddings[::1024, 0], np.full(blocks, np.float16(1 / 16)))


def test_fewer_rows_than_keys_writes_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="3 embeddings for 4 keys"):
        write_pool(iter([np.ones((3, 2), np.float32)]), ["a", "b", "c", "d"], 2, tmp_path / "pool")
    assert not (tmp_path / "pool" / "embeddings.npy").exists()
