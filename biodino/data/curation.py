"""Curation while packing: undecodable and tiny images, exact duplicates (SHA-256) and near duplicates.

Near duplicates use a 64-bit difference hash (dHash): the image in grayscale, resized to 9x8, one bit per
horizontally adjacent pair (left brighter than right). Re-encodings, resizes and small edits change few
bits, so two images within ``threshold`` Hamming distance are taken as the same photograph. Lookup is
multi-index hashing: the hash is split into threshold + 1 chunks and two hashes within the threshold
must agree on at least one chunk (pigeonhole), so only bucket-mates are compared.

A hash says little about a flat image (no brightness differences: every bit is 0), a smooth gradient (all bits
alike: every left-to-right brightening image shares it) or an extreme strip (a 9x8 resize of it is mostly
interpolation), so those are matched only as exact duplicates; and two hashes match only
when the pictures also agree in aspect ratio and mean colour, as a rescaled or re-encoded copy does. Pixels are
read as a viewer shows them (``decode.to_rgb``): 16-bit images are no longer white squares that all match.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from PIL import Image

from biodino.data.decode import to_rgb
from biodino.data.sources import SourceImage

FLAT_RANGE = 8  # grey levels between the darkest and brightest of the 9x8 thumbnail below which it is flat
MIN_MINORITY_BITS = 8  # a hash with fewer 0s or fewer 1s than this describes a gradient, not a picture
MAX_ASPECT = 8.0  # longer side / shorter side beyond which a picture is a strip
ASPECT_TOLERANCE = 0.1  # relative difference of aspect ratios two near duplicates may have
COLOUR_TOLERANCE = 16  # per channel, in 8-bit levels, between the mean colours of two near duplicates


@dataclass(frozen=True)
class Inspection:
    """What curation needs to know of one input file."""

    item: SourceImage
    status: str  # "ok", "undecodable", "unreadable" or "too_small"
    size: tuple[int, int] = (0, 0)  # as displayed (EXIF orientation applied)
    sha256: str = ""
    dhash: int = 0
    hashable: bool = False  # the dHash describes the picture (not flat, not a strip)
    mean_rgb: tuple[int, int, int] = (0, 0, 0)
    error: str = ""  # why an unreadable file could not be read

    def resembles(self, other: "Inspection") -> bool:
        """Same aspect ratio and mean colour within tolerance: what a rescaled or re-encoded copy keeps."""
        a, b = (i.size[0] / i.size[1] for i in (self, other))
        return (abs(a - b) <= ASPECT_TOLERANCE * max(a, b)
                and all(abs(x - y) <= COLOUR_TOLERANCE for x, y in zip(self.mean_rgb, other.mean_rgb)))


def dhash(img: Image.Image) -> tuple[int, bool]:
    """64-bit difference hash of an image (see module docstring), and whether it is informative (not flat, not
    a gradient)."""
    small = img.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    px = list(small.tobytes())
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | int(px[row * 9 + col] > px[row * 9 + col + 1])
    ones = bin(bits).count("1")
    return bits, max(px) - min(px) >= FLAT_RANGE and MIN_MINORITY_BITS <= ones <= 64 - MIN_MINORITY_BITS


def inspect(item: SourceImage, min_side: int) -> Inspection:
    """Decode fully (truncation raises), check the size, hash the bytes and the picture as displayed."""
    try:
        data = item.path.read_bytes()
    except OSError as err:
        return Inspection(item, "unreadable", error=err.strerror or str(err))
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return Inspection(item, "undecodable")
    size = rgb.size
    if min(size) < min_side:
        return Inspection(item, "too_small", size)
    bits, informative = dhash(rgb)
    mean = tuple(int(round(sum(v * n for v, n in enumerate(band.histogram())) / (size[0] * size[1])))
                 for band in rgb.split())
    return Inspection(item, "ok", size, hashlib.sha256(data).hexdigest(), bits,
                      informative and max(size) / min(size) <= MAX_ASPECT, mean)


class NearDuplicateIndex:
    """Kept inspections, bucketed by chunks of their hash for multi-index lookup within a Hamming threshold."""

    def __init__(self, threshold: int, bits: int = 64) -> None:
        self.threshold = threshold
        n = threshold + 1
        edges = [bits * i // n for i in range(n + 1)]
        self.chunks = [(lo, hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]
        self.buckets: list[dict[int, list[Inspection]]] = [{} for _ in self.chunks]

    def _keys(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << width) - 1) for lo, width in self.chunks]

    def match(self, ins: Inspection) -> bool:
        return ins.hashable and any(
            bin(ins.dhash ^ other.dhash).count("1") <= self.threshold and ins.resembles(other)
            for bucket, key in zip(self.buckets, self._keys(ins.dhash)) for other in bucket.get(key, ()))

    def add(self, ins: Inspection) -> None:
        if ins.hashable:
            for bucket, key in zip(self.buckets, self._keys(ins.dhash)):
                bucket.setdefault(key, []).append(ins)


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
        elif near is not None and near.match(ins):
            report["near_duplicates"] += 1
        else:
            seen.add(ins.sha256)
            if near is not None:
                near.add(ins)
            kept.append(ins)
    report["kept"] = len(kept)
    return kept, report
