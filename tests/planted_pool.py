"""A planted curation pool: photo-like images of a few long-tailed concepts, near duplicates of some of them
(rescaled and re-encoded), and chart-like images, with more charts as exclusion examples. Every image's truth
(concept, copy of which original, chart) is known, so curation's outcome can be scored."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONCEPTS = {"moss": 40, "coral": 20, "beetle": 10, "orchid": 5}  # distinct images per concept: long-tailed
HUES = {"moss": 0.30, "coral": 0.02, "beetle": 0.62, "orchid": 0.83}
STRIPES = {"moss": (3, 0.0), "coral": (6, 1.2), "beetle": (2, 2.2), "orchid": (9, 0.6)}  # (frequency, angle)


def concept_image(concept: str, seed: int, size: int = 72) -> Image.Image:
    """A picture of ``concept``: its hue and stripe pattern, with blobs, shifts and tints that differ per seed."""
    rng = np.random.default_rng(seed * 7919 + sorted(CONCEPTS).index(concept))
    ys, xs = np.mgrid[0:size, 0:size] / size
    freq, angle = STRIPES[concept]
    freq *= rng.uniform(0.7, 1.4)
    angle += rng.normal(0, 0.4)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
    hue = HUES[concept] + rng.normal(0, 0.02)
    dark, light = (np.array(colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.5, 0.9), v)) for v in (0.35, 0.9))
    img = dark[:, None, None] + (light - dark)[:, None, None] * wave[None]
    for _ in range(int(rng.integers(4, 12))):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
        tint = np.array(colorsys.hsv_to_rgb((hue + rng.normal(0, 0.15)) % 1, rng.uniform(0.3, 1), rng.uniform(0.2, 1)))
        img = img * (1 - blob[None]) + tint[:, None, None] * blob[None]
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8))


def chart_image(seed: int, size: int = 72) -> Image.Image:
    """A bar or line chart on white, with axes."""
    rng = np.random.default_rng(10_000 + seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    d.line([(8, 4), (8, size - 8), (size - 4, size - 8)], fill="black", width=2)
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    if seed % 2:
        n = int(rng.integers(3, 7))
        for i in range(n):
            x0 = 12 + i * (size - 20) // n
            top = int(rng.integers(12, size - 14))
            d.rectangle([x0, top, x0 + (size - 20) // n - 3, size - 9], fill=colour)
    else:
        points = [(10 + i * (size - 14) // 6, int(rng.integers(8, size - 12))) for i in range(7)]
        d.line(points, fill=colour, width=2)
    return img


def near_copy(img: Image.Image, seed: int) -> Image.Image:
    """A rescaled (0.6-0.85x) copy, re-encoded as JPEG quality 60-80: what a re-upload looks like."""
    import io

    rng = np.random.default_rng(20_000 + seed)
    scale = rng.uniform(0.6, 0.85)
    small = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=int(rng.integers(60, 81)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@dataclass
class PlantedPool:
    root: Path
    originals: dict[str, str] = field(default_factory=dict)  # path -> concept, the distinct photo-like images
    copies: dict[str, str] = field(default_factory=dict)  # near-duplicate path -> its original's path
    charts: list[str] = field(default_factory=list)
    examples: Path = Path()  # exclusion examples: examples/charts/*.png


def make_pool(root: Path, copies_every: int = 3, charts: int = 12, chart_examples: int = 6) -> PlantedPool:
    """Images under ``root/pool/`` (flat, so nothing labels them) and ``root/examples/charts/``."""
    pool = PlantedPool(root, examples=root / "examples")
    (root / "pool").mkdir(parents=True)
    n = 0
    for concept, count in CONCEPTS.items():
        for i in range(count):
            img = concept_image(concept, i)
            path = root / "pool" / f"{n:04d}.png"
            img.save(path)
            pool.originals[str(path)] = concept
            n += 1
            if i % copies_every == 0:
                copy = root / "pool" / f"{n:04d}.jpg"
                near_copy(img, n).save(copy, quality=95)
                pool.copies[str(copy)] = str(path)
                n += 1
    for i in range(charts):
        path = root / "pool" / f"{n:04d}.png"
        chart_image(i).save(path)
        pool.charts.append(str(path))
        n += 1
    (root / "examples" / "charts").mkdir(parents=True)
    for i in range(chart_examples):
        chart_image(1000 + i).save(root / "examples" / "charts" / f"{i}.png")
    return pool
