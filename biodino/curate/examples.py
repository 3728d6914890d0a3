"""Example-based filtering: images of unwanted categories (drawings, charts, documents, lab imagery) given as
example folders, one sub-folder per category with its own threshold; a pool image whose cosine similarity to
a category's nearest example reaches the threshold is removed (``exclude``) or, for wanted examples, only
such images are kept (``include``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biodino.curate.neighbours import top_k
from biodino.data.sources import InputError
from biodino.eval.embed_inputs import labelled_paths

SHOWN = 5  # removed images listed per category in the report, each with its closest example


@dataclass(frozen=True)
class Category:
    name: str
    examples: tuple[Path, ...]
    threshold: float


def categories(folder: Path, threshold: float, overrides: dict[str, float]) -> list[Category]:
    """The categories of an example folder: each sub-folder holding images is one (named after it); images placed
    directly in the folder form one named after the folder. ``overrides`` (name -> threshold) must name them."""
    if not folder.is_dir():
        raise InputError(f"example folder {folder} does not exist or is not a folder")
    groups = [(d.name, d) for d in sorted(folder.iterdir()) if d.is_dir()]
    loose = [p for p in sorted(folder.iterdir()) if p.is_file()]
    found = [(name, tuple(labelled_paths([str(d)])[0])) for name, d in groups]
    if loose:
        found.append((folder.name, tuple(labelled_paths([str(p) for p in loose])[0])))
    found = [(name, paths) for name, paths in found if paths]
    if not found:
        raise InputError(f"example folder {folder} holds no images")
    return [Category(name, paths, overrides.get(name, threshold)) for name, paths in found]


def nearest_examples(pool: np.ndarray, examples: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per pool row: the similarity to the nearest of ``examples`` (unit rows) and that example's index."""
    sims, idx = top_k(pool, examples, 1, device)
    return sims[:, 0], idx[:, 0]


def report(category: Category, hit: np.ndarray, sims: np.ndarray, nearest: np.ndarray, keys: list[str],
           rng: np.random.Generator) -> dict:
    """Count and a random sample of the rows ``hit`` matched, each with its closest example."""
    rows = np.flatnonzero(hit)
    shown = rng.choice(rows, size=min(SHOWN, len(rows)), replace=False) if len(rows) else rows
    return {"threshold": category.threshold, "examples": len(category.examples), "matched": int(len(rows)),
            "sample": [{"key": keys[i], "similarity": round(float(sims[i]), 4),
                        "closest_example": str(category.examples[nearest[i]])} for i in sorted(shown)]}
