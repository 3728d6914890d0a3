"""The pool being curated: its L2-normalized embeddings as a float16 ``.npy`` (memory-mapped, so a step reads the
rows it needs) and the sample keys in input order. Built once from ``biodino embed``'s output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biodino.fs.atomic import atomic_write_file, atomic_write_text

CHUNK = 65536  # rows normalized at a time while the pool is built


@dataclass(frozen=True)
class Pool:
    embeddings: np.ndarray  # (n, d) float16, unit rows; a read-only memmap
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def build_pool(embed_output: Path, folder: Path) -> Pool:
    """``embeddings.npy`` and ``keys.json`` in ``folder`` from an embed ``.npz``: rows L2-normalized, stored in
    float16 (half the memory of the embed output; cosine similarities keep 3 significant digits)."""
    with np.load(embed_output, allow_pickle=False) as data:
        raw, keys = data["embeddings"], [str(k) for k in data["keys"]]
    folder.mkdir(parents=True, exist_ok=True)

    def write(path: Path) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=raw.shape)
        for start in range(0, len(raw), CHUNK):
            rows = raw[start:start + CHUNK].astype(np.float32)
            out[start:start + CHUNK] = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        out.flush()

    atomic_write_file(folder / "embeddings.npy", write)
    atomic_write_text(folder / "keys.json", json.dumps(keys) + "\n")
    return open_pool(folder)


def open_pool(folder: Path) -> Pool:
    return Pool(np.load(folder / "embeddings.npy", mmap_mode="r"), json.loads((folder / "keys.json").read_text()))
