"""The pool being curated: its L2-normalized embeddings as a float16 ``.npy`` (memory-mapped, so a step reads the
rows it needs) and the sample keys in input order. Written once from ``biodino embed``'s parts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from biodino.fs.atomic import atomic_write_file, atomic_write_text

CHUNK = 65536  # rows normalized at a time while the pool is built


@dataclass(frozen=True)
class Pool:
    embeddings: np.ndarray  # (n, d) float16, unit rows; a read-only memmap
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def write_pool(blocks: Iterable[np.ndarray], keys: list[str], width: int, folder: Path) -> None:
    """``embeddings.npy`` and ``keys.json`` in ``folder`` from embedding blocks in key order (``biodino embed``'s
    parts): rows L2-normalized and stored in float16 (half the memory of float32; cosine similarities keep 3
    significant digits), written block by block so the pool is never in memory whole."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(path: Path) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(len(keys), width))
        start = 0
        for block in blocks:
            for rows in np.array_split(block, -(-len(block) // CHUNK) or 1):
                rows = rows.astype(np.float32)
                out[start:start + len(rows)] = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
                start += len(rows)
        if start != len(keys):
            raise ValueError(f"{start} embeddings for {len(keys)} keys")
        out.flush()

    atomic_write_file(folder / "embeddings.npy", write)
    atomic_write_text(folder / "keys.json", json.dumps(keys) + "\n")


def open_pool(folder: Path) -> Pool:
    return Pool(np.load(folder / "embeddings.npy", mmap_mode="r"), json.loads((folder / "keys.json").read_text()))
