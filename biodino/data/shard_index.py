"""The shard index: one JSON file listing shards and their sample counts (readable by webdataset's ``wids``)."""

from __future__ import annotations

import glob
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shard:
    path: Path
    samples: int


class ShardIndexError(ValueError):
    """Missing, empty or malformed shards or index; the message names the path."""


def write_index(path: Path, shards: list[Shard], extra: dict[str, Any]) -> None:
    """Write atomically: a temporary file renamed over the target."""
    doc = {"wids_version": 1,
           "shardlist": [{"url": s.path.name, "nsamples": s.samples} for s in shards],
           "total_samples": sum(s.samples for s in shards), **extra}
    from biodino.fs.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_index(path: Path) -> list[Shard]:
    """Shards of an index file, paths resolved relative to it."""
    try:
        doc = json.loads(path.read_text())
        entries = doc["shardlist"]
        return [Shard(path.parent / e["url"], int(e["nsamples"])) for e in entries]
    except FileNotFoundError:
        raise ShardIndexError(f"shard index not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ShardIndexError(f"malformed shard index {path}: {err}") from None


def count_samples(path: Path) -> int:
    """Samples in a tar shard: distinct keys (member names up to the first dot)."""
    with tarfile.open(path) as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def resolve_shards(spec: str) -> list[Shard]:
    """An index file (``*.json``) or a shard glob, checked: every shard exists, is non-empty, has samples."""
    if spec.endswith(".json"):
        shards = read_index(Path(spec))
    else:
        paths = sorted(glob.glob(spec))
        if not paths:
            raise ShardIndexError(f"no shards match {spec}")
        shards = [Shard(Path(p), count_samples(Path(p)) if Path(p).stat().st_size else 0) for p in paths]
    if not shards:
        raise ShardIndexError(f"no shards listed in {spec}")
    for s in shards:
        if not s.path.is_file():
            raise ShardIndexError(f"shard not found: {s.path}")
        if s.path.stat().st_size == 0 or s.samples == 0:
            raise ShardIndexError(f"shard is empty: {s.path}")
    return shards
