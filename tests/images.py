"""Generated images saved to disk for data tests."""

from __future__ import annotations

from pathlib import Path

from biodino.data.synthetic import jpeg_bytes, photo

__all__ = ["jpeg_bytes", "packed_photos", "photo", "save_photo"]


def save_photo(path: Path, seed: int, width: int = 96, height: int = 72, quality: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo(seed, width, height), quality))
    return path


def packed_photos(root: Path, count: int, per_shard: int, seed: int) -> Path:
    """``count`` generated 64x48 photographs packed into shards of ``per_shard``; returns the shard index."""
    from biodino.data.pack import PackOptions, pack

    for i in range(count):
        save_photo(root / "img" / f"{i:03d}.jpg", seed=seed + i, width=64, height=48)
    pack([str(root / "img")], PackOptions(out=root / "shards", prefix="s", max_count=per_shard, min_side=16))
    return root / "shards" / "s.json"
