"""Shared test settings: deterministic CPU runs; a small shard set for the multi-process and Slurm runs."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """24 generated photographs packed into 4 shards: the index path."""
    from biodino.data.pack import PackOptions, pack
    from tests.images import save_photo

    root = tmp_path_factory.mktemp("tiny_shards")
    for i in range(24):
        save_photo(root / "img" / f"{i:03d}.jpg", seed=3000 + i, width=64, height=48)
    pack([str(root / "img")], PackOptions(out=root / "shards", prefix="s", max_count=6, min_side=16))
    return root / "shards" / "s.json"
