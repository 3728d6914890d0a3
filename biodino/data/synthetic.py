"""Procedural images for tests, benchmarks and demos: photograph-like pictures and labelled shapes and textures."""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
from pathlib import Path

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


# --- Labelled shapes and textures: demo data for self-supervised runs and k-NN evaluation. ---

SHAPE_CLASSES: tuple[str, ...] = (
    "disc", "ring", "square", "triangle", "cross", "star", "stripes", "checker", "dots", "waves",
)
MIN_CONTRAST = 0.3  # Euclidean RGB distance on [0, 1] between the object and the background under it
# Muted colours (HSV saturation at most this): DINOv2's colour jitter (hue +-0.1 turn, saturation x0.8-1.2) is
# made for natural images; a pair of saturated random colours identifies an image better than its shape does,
# and self-supervised training then clusters by colour (demo k-NN gain +10 points with saturation up to 1).
MAX_SATURATION = 0.35
# Object radius in image sides: at the 32-pixel training size a diameter of 1.6-3.2 patches of 8 pixels.
RADIUS = (0.2, 0.4)
# Texture period in object radii: 3.8-10 px at 32 pixels, so that downsampling for training and evaluation does
# not blur stripes, checks, dots and waves into one flat colour (small dots did with 2.6-4.5 px). Together with
# RADIUS this is worth about 10 points of demo k-NN gain over radii 0.14-0.32 and periods 0.08-0.14 image sides.
TEXTURE_PERIOD = (0.6, 0.8)
_SUPERSAMPLE = 2  # masks are drawn on a 2x finer grid and averaged: cheap anti-aliasing
_REACH = 1.15  # every shape lies within this many radii of its centre (square corners: 1.13)


@dataclasses.dataclass(frozen=True)
class _Nuisance:
    """Everything about an image except its class: pose, colours, background gradient, noise."""

    cx: float
    cy: float
    radius: float
    angle: float
    direction: np.ndarray  # unit vector of the background gradient
    fg: np.ndarray
    bg: np.ndarray
    grad: np.ndarray  # RGB change of the background per image side along ``direction``
    noise: np.ndarray  # (size, size, 3) float32


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image-side units on the supersampled grid (cached, read-only)."""
    n = size * _SUPERSAMPLE
    centres = ((np.arange(n) + 0.5) / n).astype(np.float32)
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _min_distance(fg: np.ndarray, bg: np.ndarray, grad: np.ndarray, lo: float, hi: float) -> float:
    """Smallest ||fg - (bg + grad * t)|| for t in [lo, hi]: the worst contrast across the object."""
    diff = fg - bg
    t = np.clip(diff @ grad / max(grad @ grad, 1e-12), lo, hi)
    return float(np.linalg.norm(diff - grad * t))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """RGB in [0, 1] with a uniform random hue, saturation up to MAX_SATURATION and value 0.05-1."""
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, MAX_SATURATION), rng.uniform(0.05, 1)))


def _nuisance(rng: np.random.Generator, size: int) -> _Nuisance:
    """Pose, colours, background gradient and sensor noise; drawn first so they depend on the seed alone."""
    radius = rng.uniform(*RADIUS)
    cx, cy = rng.uniform(_REACH * radius, 1 - _REACH * radius, 2)
    angle, beta = rng.uniform(0, 2 * np.pi, 2)
    direction = np.array([np.cos(beta), np.sin(beta)])
    centre = (cx - 0.5) * direction[0] + (cy - 0.5) * direction[1]
    while True:
        fg, bg = _colour(rng), _colour(rng)
        grad = rng.uniform(-0.3, 0.3) + rng.uniform(-0.05, 0.05, 3)  # mostly brightness, slightly tinted
        if _min_distance(fg, bg, grad, centre - _REACH * radius, centre + _REACH * radius) > MIN_CONTRAST:
            break
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(0.03, 0.06))
    return _Nuisance(cx, cy, radius, angle, direction, fg, bg, grad, noise)


def _region(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Disc or square area that a texture fills (random, so the outline does not give a texture away)."""
    if rng.uniform() < 0.5:
        return u * u + v * v <= 1
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


def _star(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Five-pointed star with straight edges: folded into one half-spike, inside the tip-to-notch line."""
    inner, step = rng.uniform(0.4, 0.5), 2 * np.pi / 5
    psi = np.abs((np.arctan2(v, u) + step / 2) % step - step / 2)  # 0 on a tip's axis, step/2 on a notch's
    rho = np.hypot(u, v) / 1.05
    tip, notch = np.array([1.0, 0.0]), inner * np.array([np.cos(step / 2), np.sin(step / 2)])
    normal = np.array([notch[1] - tip[1], tip[0] - notch[0]])  # points away from the centre
    return normal[0] * (rho * np.cos(psi) - tip[0]) + normal[1] * (rho * np.sin(psi) - tip[1]) <= 0


def _triangle(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Equilateral triangle with circumradius 1.1 (intersection of three half-planes)."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.55
    return inside


def _cross(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Plus sign with arms of random thickness."""
    w = rng.uniform(0.22, 0.32)
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= 1)) | ((av <= w) & (au <= 1))


def _ring(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Annulus with a random hole of 45-65% of the radius."""
    rho2 = u * u + v * v
    return (rho2 <= 1) & (rho2 >= rng.uniform(0.45, 0.65) ** 2)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Binary texture in rotated object coordinates (u, v, in radii) with a random period and phase."""
    p = rng.uniform(*TEXTURE_PERIOD)
    a, b = u / p + rng.uniform(0, 1), v / p + rng.uniform(0, 1)
    if kind == "stripes":
        return (a % 1) < 0.5
    if kind == "checker":
        return (np.floor(a) + np.floor(b)) % 2 == 0
    if kind == "dots":
        da, db = a - np.round(a), b - np.round(b)
        return da * da + db * db <= rng.uniform(0.28, 0.36) ** 2
    amp, wavelength = rng.uniform(0.35, 0.5), rng.uniform(2.2, 3.0)
    return ((a + amp * np.sin(2 * np.pi * b / wavelength)) % 1) < 0.5


_SHAPES = {
    "disc": lambda u, v, rng: u * u + v * v <= 1,
    "ring": _ring,
    "square": lambda u, v, rng: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": _triangle,
    "cross": _cross,
    "star": _star,
}


def _coverage(label: int, nz: _Nuisance, rng: np.random.Generator, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the foreground, shape (size, size)."""
    ys, xs = _grid(size)
    c, s = np.float32(np.cos(nz.angle)), np.float32(np.sin(nz.angle))
    dx, dy = xs - np.float32(nz.cx), ys - np.float32(nz.cy)
    a, b = c * dx + s * dy, -s * dx + c * dy  # rotated, in image-side units
    u, v = a / np.float32(nz.radius), b / np.float32(nz.radius)  # rotated, in radii
    name = SHAPE_CLASSES[label]
    if name in _SHAPES:
        mask = _SHAPES[name](u, v, rng)
    else:
        mask = _region(u, v, rng) & _texture(name, u, v, rng)
    k = _SUPERSAMPLE
    return sum(mask[i::k, j::k].astype(np.float32) for i in range(k) for j in range(k)) / (k * k)


def shape_image(label: int, seed: int, size: int = 64) -> Image.Image:
    """One RGB image of class ``label`` (index into SHAPE_CLASSES), fully determined by ``seed``.

    Pose, colours, gradient and noise come from ``seed`` alone, so one seed gives the same nuisance for every
    class and only the shape or texture differs; ``seed`` must be a non-negative integer.
    """
    if not 0 <= label < len(SHAPE_CLASSES):
        raise ValueError(f"label must be in [0, {len(SHAPE_CLASSES)}), got {label}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    nz = _nuisance(rng, size)
    cover = _coverage(label, nz, rng, size)[..., None]
    centres = ((np.arange(size) + 0.5) / size - 0.5).astype(np.float32)
    dx, dy = nz.direction.astype(np.float32)
    ramp = centres[None, :, None] * dx + centres[:, None, None] * dy
    bg, fg, grad = (x.astype(np.float32) for x in (nz.bg, nz.fg, nz.grad))
    img = (bg + ramp * grad) * (1 - cover) + fg * cover + nz.noise
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def write_shapes(root: Path, n_per_class: int, seed: int = 0, size: int = 64) -> list[tuple[Path, int]]:
    """Write n_per_class PNG images per class as root/<class>/<index>.png; return (path, label) in a stable order.

    Every image gets its own seed derived from (seed, label, index), so nuisance factors are independent across
    images and classes.
    """
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be non-negative, got {n_per_class}")
    root = Path(root)
    items = []
    for label, name in enumerate(SHAPE_CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image_seed = int(np.random.SeedSequence([seed, label, i]).generate_state(1)[0])
            path = folder / f"{i:05d}.png"
            shape_image(label, image_seed, size).save(path)
            items.append((path, label))
    return items
