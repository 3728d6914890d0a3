"""Procedural photograph-like images (gradients, soft blobs, sensor noise) for tests, benchmarks and demos."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(seed: int, width: int = 96, height: int = 72) -> Image.Image:
    """A smooth, varied RGB image; different seeds give perceptually distinct pictures."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    img = rng.uniform(0, 1, (3, 1, 1)) + rng.uniform(-0.5, 0.5, (3, 1, 1)) * (xs + ys)[None]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.2)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
        img += rng.uniform(-0.8, 0.8, (3, 1, 1)) * blob[None]
    img += rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
