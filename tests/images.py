"""Generated images saved to disk for data tests."""

from __future__ import annotations

from pathlib import Path

from biodino.data.synthetic import jpeg_bytes, photo

__all__ = ["jpeg_bytes", "photo", "save_photo"]


def save_photo(path: Path, seed: int, width: int = 96, height: int = 72, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo(seed, width, height), quality))
    return path
