"""Image inputs: folders (recursive) and list files of paths, each path with an optional repeat count.

A folder that cannot be listed is recorded, not silently skipped (``Path.rglob`` ignores permission errors)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class SourceImage:
    path: Path
    source: str  # the folder or list file it came from, recorded in the sample's metadata
    repeats: int = 1


@dataclass
class Listing:
    images: list[SourceImage] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # folders or files, and why


class InputError(ValueError):
    """An input that cannot be used (missing path, malformed list line, nothing to read); names the culprit."""


def walk_images(folder: Path, unreadable: list[tuple[Path, str]]) -> list[Path]:
    """Image files under ``folder``, sorted; folders that cannot be listed are appended to ``unreadable``."""
    found: list[Path] = []

    def failed(err: OSError) -> None:
        unreadable.append((Path(err.filename), err.strerror or str(err)))

    for root, dirs, files in os.walk(folder, onerror=failed):
        dirs.sort()
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def list_inputs(inputs: list[str]) -> Listing:
    """Images from each input in a stable order: folders walked sorted, list files in line order."""
    listing = Listing()
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            listing.images += [SourceImage(p, path.name) for p in walk_images(path, listing.unreadable)]
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            listing.images.append(SourceImage(path, path.parent.name))
        elif path.is_file():
            listing.images += _read_list(path)
        else:
            raise InputError(f"input not found: {path}")
    return listing


def list_lines(list_file: Path) -> Iterator[tuple[int, Path, str]]:
    """(line number, path, text after a tab) of a list file's lines ``path`` or ``path<TAB>field``; relative paths
    are relative to the list file; blank lines and # comments are skipped."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{list_file}: not a text list of image paths (an image? pass its folder)") from None
    except OSError as err:
        raise InputError(f"{list_file}: cannot be read: {err.strerror}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, field = line.partition("\t")
        path = Path(name)
        yield n, path if path.is_absolute() else list_file.parent / path, field.strip()


def _read_list(list_file: Path) -> list[SourceImage]:
    """Lines ``path`` or ``path<TAB>repeats``."""
    images = []
    for n, path, weight in list_lines(list_file):
        try:
            repeats = int(weight) if weight else 1
        except ValueError:
            raise InputError(f"{list_file}:{n}: repeat count {weight!r} is not an integer") from None
        if repeats < 1:
            raise InputError(f"{list_file}:{n}: repeat count must be >= 1, got {repeats}")
        images.append(SourceImage(path, list_file.stem, repeats))
    return images
