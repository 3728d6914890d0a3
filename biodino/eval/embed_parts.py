"""The finished parts of one ``biodino embed`` output, kept in ``OUT.parts/`` until rank 0 merges them: one
atomically written ``.npz`` per part and a manifest of the command that made them, so a rerun of the same
command (after a kill or a preemption, on any number of ranks) embeds only the missing parts, and a different
command refuses them instead of mixing its embeddings with theirs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from biodino.eval.embed_inputs import Label
from biodino.fs.atomic import atomic_write, atomic_write_text

MANIFEST = "manifest.json"


class PartsMismatchError(ValueError):
    """``OUT.parts/`` holds parts of another command."""


@dataclass
class Embedded:
    """Embeddings with their sample keys and labels, and the samples skipped with the reason."""

    keys: list[str] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)  # (n_i, dim) chunks
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def array(self, width: int) -> np.ndarray:
        return np.concatenate(self.embeddings) if self.embeddings else np.empty((0, width), np.float32)


class PartStore:
    def __init__(self, out: Path, manifest: dict[str, Any]) -> None:
        self.dir = out.with_name(out.name + ".parts")
        self.manifest = manifest

    def open(self) -> None:
        """Create the folder and its manifest, or check that the manifest there is this command's."""
        path = self.dir / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text())
            if found != self.manifest:
                changed = sorted(k for k in {*found, *self.manifest} if found.get(k) != self.manifest.get(k))
                raise PartsMismatchError(f"{self.dir} holds parts of another embed command (it differs in "
                                         f"{', '.join(changed)}); rerun that command or delete the folder")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.manifest, indent=1) + "\n")

    def done(self) -> set[str]:
        return {p.stem for p in self.dir.glob("*.npz")}

    def write(self, name: str, part: Embedded, width: int) -> None:
        arrays = {"keys": np.array(part.keys, dtype=str), "labels": np.array([json.dumps(lab) for lab in part.labels],
                                                                              dtype=str),
                  "embeddings": part.array(width).astype(np.float32),
                  "skipped": np.array([k for k, _ in part.skipped], dtype=str),
                  "reasons": np.array([why for _, why in part.skipped], dtype=str)}
        atomic_write(self.dir / f"{name}.npz", lambda f: np.savez(f, **arrays))

    def merged(self, names: list[str], width: int, embeddings: bool = True) -> Embedded:
        """Every part in plan order, concatenated; without ``embeddings``, only keys, labels and skips (an npz
        member is read only when asked for)."""
        out = Embedded()
        for name in names:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as data:
                out.keys += [str(k) for k in data["keys"]]
                out.labels += [_label(json.loads(s)) for s in data["labels"]]
                if embeddings:
                    out.embeddings.append(data["embeddings"].reshape(-1, width))
                out.skipped += list(zip(map(str, data["skipped"]), map(str, data["reasons"])))
        return out

    def blocks(self, names: list[str], width: int) -> Iterator[np.ndarray]:
        """Each part's embeddings in plan order, one part in memory at a time."""
        for name in names:
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as data:
                yield data["embeddings"].reshape(-1, width)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _label(value: Optional[object]) -> Label:
    return tuple(value) if isinstance(value, list) else value  # type: ignore[return-value]
