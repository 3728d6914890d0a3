"""Curation while packing: undecodable and tiny images, exact duplicates (SHA-256) and near duplicates.

Near duplicates use a 64-bit difference hash (dHash): the image in grayscale, resized to 9x8, one bit per
horizontally adjacent pair (left brighter than right). Re-encodings, resizes and small edits change few
bits, so two images within ``threshold`` Hamming distance are taken as the same photograph. Lookup is
multi-index hashing: the hash is split into threshold + 1 chunks and two hashes within the threshold
must agree on at least one chunk (pigeonhole), so only bucket-mates are compared.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from biodino.data.sources import SourceImage


@dataclass(frozen=True)
class Inspection:
    """What curation needs to know of one input file."""

    item: SourceImage
    status: str  # "ok", "undecodable" or "too_small"
    size: tuple[int, int] = (0, 0)
    sha256: str = ""
    dhash: int = 0


def dhash(img: Image.Image) -> int:
    """64-bit difference hash of an image (see module docstring)."""
    small = img.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    px = list(small.tobytes())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | int(px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def inspect(item: SourceImage, min_side: int) -> Inspection:
    """Decode fully (truncation raises), check the size, hash the bytes and the picture."""
    try:
        data = item.path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = img.size
            if min(size) < min_side:
                return Inspection(item, "too_small", size)
            return Inspection(item, "ok", size, hashlib.sha256(data).hexdigest(), dhash(img))
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return Inspection(item, "undecodable")


class NearDuplicateIndex:
    """Kept hashes, bucketed by chunk for multi-index lookup within a Hamming threshold."""

    def __init__(self, threshold: int, bits: int = 64) -> None:
        self.threshold = threshold
        n = threshold + 1
        edges = [bits * i // n for i in range(n + 1)]
        self.chunks = [(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.chunks]

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << width) - 1) for lo, width in self.chunks]

    def match(self, h: int) -> bool:
        return any(bin(h ^ other).count("1") <= self.threshold
                   for bucket, key in zip(self.buckets, self._keys(h)) for other in bucket.get(key, ()))

    def add(self, h: int) -> None:
        for bucket, key in zip(self.buckets, self._keys(h)):
            bucket.setdefault(key, []).append(h)


def curate(inspections: list[Inspection], near_threshold: Optional[int]) -> tuple[list[Inspection], Counter]:
    """Keep the first of each exact or near duplicate group, in input order; count every drop by reason."""
    report: Counter = Counter(inputs=len(inspections))
    seen: set[str] = set()
    near = NearDuplicateIndex(near_threshold) if near_threshold is not None else None
    kept = []
    for ins in inspections:
        if ins.status != "ok":
            report[ins.status] += 1
        elif ins.sha256 in seen:
            report["exact_duplicates"] += 1
        elif near is not None and near.match(ins.dhash):
            report["near_duplicates"] += 1
        else:
            seen.add(ins.sha256)
            if near is not None:
                near.add(ins.dhash)
            kept.append(ins)
    report["kept"] = len(kept)
    return kept, report
