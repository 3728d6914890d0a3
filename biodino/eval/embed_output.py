"""The file ``biodino embed`` writes and ``biodino eval`` reads, atomically.

``.npz``: arrays ``embeddings`` (n, dim) float32, ``keys`` (n,) (the shard key or the file path) and, when every
sample has one, ``labels``: (n,) class names, or for trait sets an (n, traits) 0/1 array with the trait names in
``label_names``. ``.parquet`` (needs pyarrow): columns ``key``, ``embedding`` and ``label`` (a string or a list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from biodino.eval.embed_inputs import Label
from biodino.fs.atomic import atomic_write

SUFFIXES = (".npz", ".parquet")


def multi_hot(labels: Sequence[Label]) -> tuple[np.ndarray, list[str]]:
    """(n, traits) uint8 membership of each sample's label set (a single label is a set of one); trait names."""
    sets = [set(lab) if isinstance(lab, tuple) else {lab} for lab in labels]
    names = sorted(set().union(*sets)) if sets else []
    column = {name: j for j, name in enumerate(names)}
    out = np.zeros((len(sets), len(names)), np.uint8)
    for i, traits in enumerate(sets):
        out[i, [column[t] for t in traits]] = 1
    return out, names


def write_embeddings(out: Path, embeddings: np.ndarray, keys: Sequence[str],
                     labels: Optional[Sequence[Label]] = None) -> Path:
    """Write ``out`` (``SUFFIXES``); ``labels`` None or containing a None writes no labels."""
    if labels is not None and any(lab is None for lab in labels):
        labels = None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"embeddings": embeddings.astype(np.float32), "keys": np.array(list(keys), dtype=str)}
        if labels is not None and any(isinstance(lab, tuple) for lab in labels):
            arrays["labels"], names = multi_hot(labels)
            arrays["label_names"] = np.array(names, dtype=str)
        elif labels is not None:
            arrays["labels"] = np.array(list(labels), dtype=str)
        atomic_write(out, lambda f: np.savez(f, **arrays))
    elif out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"key": list(keys), "embedding": list(embeddings.astype(np.float32))}
        if labels is not None:
            columns["label"] = [list(lab) if isinstance(lab, tuple) else lab for lab in labels]
        atomic_write(out, lambda f: pq.write_table(pa.table(columns), f))
    else:
        raise ValueError(f"--out must end in {' or '.join(SUFFIXES)}, got {out.name}")
    return out
