"""Packer inputs: image folders (recursive) and list files of paths, each path with an optional repeat count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class SourceImage:
    path: Path
    source: str  # the folder or list file it came from, recorded in the sample's metadata
    repeats: int = 1


class InputError(ValueError):
    """A packer input that cannot be used (missing path, malformed list line); names the culprit."""


def list_inputs(inputs: list[str]) -> list[SourceImage]:
    """Images from each input in a stable order: folders walked sorted, list files in line order."""
    images: list[SourceImage] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            images += [SourceImage(p, path.name) for p in sorted(path.rglob("*"))
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif path.is_file():
            images += _read_list(path)
        else:
            raise InputError(f"input not found: {path}")
    return images


def _read_list(list_file: Path) -> list[SourceImage]:
    """Lines ``path`` or ``path<TAB>repeats``; relative paths are relative to the list file; # comments."""
    images = []
    for n, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, weight = line.partition("\t")
        try:
            repeats = int(weight) if weight.strip() else 1
        except ValueError:
            raise InputError(f"{list_file}:{n}: repeat count {weight.strip()!r} is not an integer") from None
        if repeats < 1:
            raise InputError(f"{list_file}:{n}: repeat count must be >= 1, got {repeats}")
        path = Path(name)
        images.append(SourceImage(path if path.is_absolute() else list_file.parent / path, list_file.stem, repeats))
    return images
