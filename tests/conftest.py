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
    from tests.images import packed_photos

    return packed_photos(tmp_path_factory.mktemp("tiny_shards"), count=24, per_shard=6, seed=3000)


def pytest_collection_modifyitems(items) -> None:
    """Markers by folder: ``-m "not oracle"``, ``-m integration``; Slurm tests carry ``slurm`` themselves."""
    for item in items:
        for folder in ("integration", "oracle"):
            if f"/tests/{folder}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, folder))
