"""Labelled shape/texture images: determinism, files on disk, nuisance variation, muted colours, textures that
survive downsampling to the demo's training size, class separable by shape only."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from biodino.data.synthetic import SHAPE_CLASSES, shape_image, write_shapes

N_PER_CLASS = 200
DISC, RING = SHAPE_CLASSES.index("disc"), SHAPE_CLASSES.index("ring")
TEXTURES = ("stripes", "checker", "dots", "waves")
TRAIN_SIZE = 32  # configs/demo.yaml crops.global_size: the demo trains and evaluates at 32 x 32 pixels


def pixels(label: int, seed: int, size: int = 64) -> np.ndarray:
    return np.asarray(shape_image(label, seed, size)).astype(np.float32) / 255


def foreground(img: np.ndarray) -> np.ndarray:
    """Pixels far from the background: a plane fitted to the 2-pixel border (objects never reach it), 3x3-smoothed."""
    h, w, _ = img.shape
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.ones((h, w), dtype=bool)
    border[2:-2, 2:-2] = False
    design = np.stack([np.ones_like(ys), ys, xs], axis=-1).astype(np.float32)
    coef, *_ = np.linalg.lstsq(design[border], img[border], rcond=None)
    dist = np.pad(np.linalg.norm(img - design @ coef, axis=-1), 1, mode="edge")
    smooth = sum(dist[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    return smooth > 0.5 * np.percentile(smooth, 99)


def downsampled(label: int, seed: int) -> np.ndarray:
    """The 64-pixel image resized to TRAIN_SIZE (bicubic, antialiased: what training and evaluation see)."""
    img = shape_image(label, seed).resize((TRAIN_SIZE, TRAIN_SIZE), Image.BICUBIC)
    return np.asarray(img).astype(np.float32) / 255


def inner_disc(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At TRAIN_SIZE: object and background colours at the object's centre, and the pixels within 0.75 radii of it.

    A disc and a ring of the same seed share pose and colours, so the ring's hole shows the background where the
    disc shows the object.
    """
    hole = np.abs(pixels(DISC, seed) - pixels(RING, seed)).sum(-1) > 0.1
    cy, cx = (np.argwhere(hole).mean(0) + 0.5) * TRAIN_SIZE / 64 - 0.5
    iy, ix = int(round(cy)), int(round(cx))
    disc, ring = downsampled(DISC, seed), downsampled(RING, seed)
    fg, bg = (x[iy - 1 : iy + 2, ix - 1 : ix + 2].reshape(-1, 3).mean(0) for x in (disc, ring))
    radius = np.sqrt((np.linalg.norm(disc - fg, axis=-1) < np.linalg.norm(disc - bg, axis=-1)).sum() / np.pi)
    ys, xs = np.mgrid[0:TRAIN_SIZE, 0:TRAIN_SIZE]
    return fg, bg, (ys - cy) ** 2 + (xs - cx) ** 2 <= (0.75 * radius) ** 2


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class centroids of standardised features on even rows, score on odd rows."""
    train = np.arange(len(labels)) % 2 == 0
    mean, std = features[train].mean(0), features[train].std(0) + 1e-8
    z = (features - mean) / std
    centroids = np.stack([z[train & (labels == c)].mean(0) for c in range(len(SHAPE_CLASSES))])
    pred = np.argmin(((z[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((pred == labels[~train]).mean())


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    """N_PER_CLASS images per class, each with its own seed (as write_shapes does)."""
    labels = np.repeat(np.arange(len(SHAPE_CLASSES)), N_PER_CLASS)
    images = np.stack([pixels(int(c), 100_000 * int(c) + i) for i, c in enumerate(labels)])
    return images, labels


def test_ten_distinct_classes() -> None:
    assert len(SHAPE_CLASSES) == len(set(SHAPE_CLASSES)) == 10


@pytest.mark.parametrize("label", range(10))
def test_same_label_and_seed_give_identical_pixels(label: int) -> None:
    assert np.array_equal(np.asarray(shape_image(label, 7)), np.asarray(shape_image(label, 7)))
    assert not np.array_equal(np.asarray(shape_image(label, 7)), np.asarray(shape_image(label, 8)))


def test_classes_differ_for_the_same_seed() -> None:
    images = [np.asarray(shape_image(label, 3)).tobytes() for label in range(10)]
    assert len(set(images)) == 10


@pytest.mark.parametrize("size", [16, 64, 97])
def test_size_and_mode(size: int) -> None:
    img = shape_image(9, 1, size)
    assert img.mode == "RGB" and img.size == (size, size)
    assert np.asarray(img).dtype == np.uint8


@pytest.mark.parametrize("label", [-1, 10])
def test_rejects_unknown_label(label: int) -> None:
    with pytest.raises(ValueError, match="label must be in"):
        shape_image(label, 0)


def test_write_shapes_layout(tmp_path) -> None:
    items = write_shapes(tmp_path, n_per_class=3, seed=5, size=32)
    assert len(items) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHAPE_CLASSES)
    assert sorted(tmp_path.rglob("*.png")) == sorted(p for p, _ in items)
    assert [label for _, label in items] == sorted(label for _, label in items)  # class-major order
    decoded = set()
    for path, label in items:
        assert path.parent == tmp_path / SHAPE_CLASSES[label] and path.suffix == ".png"
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            decoded.add(img.tobytes())
    assert len(decoded) == 30  # every image has its own seed


def test_write_shapes_is_reproducible(tmp_path) -> None:
    first = write_shapes(tmp_path / "a", n_per_class=2, seed=5, size=24)
    again = write_shapes(tmp_path / "b", n_per_class=2, seed=5, size=24)
    other = write_shapes(tmp_path / "c", n_per_class=2, seed=6, size=24)
    relative = [(p.relative_to(tmp_path / "a"), c) for p, c in first]
    assert relative == [(p.relative_to(tmp_path / "b"), c) for p, c in again]
    assert all(a.read_bytes() == b.read_bytes() for (a, _), (b, _) in zip(first, again))
    assert all(a.read_bytes() != b.read_bytes() for (a, _), (b, _) in zip(first, other))


def test_nuisance_factors_vary_within_a_class(dataset) -> None:
    images, labels = dataset
    discs = images[labels == DISC]
    assert discs.mean(axis=(1, 2)).std(axis=0).min() > 0.12  # mean colour per channel varies widely
    corner = discs[:, :4, :4].mean(axis=(1, 2))
    assert corner.std(axis=0).min() > 0.15  # so does the background colour
    areas = np.array([foreground(img).mean() for img in discs])
    assert np.percentile(areas, 90) > 2.5 * np.percentile(areas, 10)  # object size
    centres = np.array([np.argwhere(foreground(img)).mean(axis=0) for img in discs])
    assert centres.std(axis=0).min() > 3  # object position, in pixels
    residual = discs[:, 1:, 1:] - discs[:, :-1, :-1]  # neighbouring pixels of a flat area differ by noise
    assert 0.02 < np.median(np.abs(residual)) < 0.08


def test_foreground_contrasts_with_background(dataset) -> None:
    images, labels = dataset
    for img in images[labels == DISC][:50]:
        fg = foreground(img)
        assert np.linalg.norm(img[fg].mean(0) - img[~fg].mean(0)) > 0.2


@pytest.mark.parametrize("seed", range(20))
def test_disc_and_ring_differ_only_in_the_hole(seed: int) -> None:
    disc, ring = pixels(DISC, seed), pixels(RING, seed)
    hole = np.abs(disc - ring).sum(-1) > 0.1
    area = hole.sum()
    assert area > 15
    dist = np.linalg.norm(np.argwhere(hole) - np.argwhere(hole).mean(0), axis=1)
    assert dist.max() < np.sqrt(area / np.pi) + 2  # a filled, compact disc
    assert foreground(disc).sum() > foreground(ring).sum() + 0.5 * area
    cy, cx = np.round(np.argwhere(hole).mean(0)).astype(int)
    assert foreground(disc)[cy, cx] and not foreground(ring)[cy, cx]


def test_colours_are_muted_but_of_every_hue(dataset) -> None:
    """HSV saturation of the object at most 0.35 (the demo clusters by colour with saturated random colours)."""
    images, labels = dataset
    saturation, dominant = [], []
    for img in images[labels == DISC]:
        fg = foreground(img)
        inner = fg[1:-1, 1:-1] & fg[:-2, 1:-1] & fg[2:, 1:-1] & fg[1:-1, :-2] & fg[1:-1, 2:]  # away from edges
        colour = img[1:-1, 1:-1][inner].mean(0)
        if colour.max() > 0.25:  # darker colours: sensor noise and clipping blur the saturation
            saturation.append((colour.max() - colour.min()) / colour.max())
            dominant.append(colour.argmax())
    assert len(saturation) > 100 and max(saturation) < 0.4
    assert np.bincount(dominant, minlength=3).min() > 0.2 * len(dominant)  # red, green and blue hues all occur


@pytest.mark.parametrize("texture", TEXTURES)
def test_textures_survive_downsampling_to_the_training_size(texture: str) -> None:
    """Near the centre a texture keeps pixels of nearly the pure object and background colours: not one flat mix."""
    label = SHAPE_CLASSES.index(texture)
    for seed in range(20):
        fg, bg, inner = inner_disc(seed)
        pix, contrast = downsampled(label, seed)[inner], np.linalg.norm(fg - bg)
        assert (np.linalg.norm(pix - fg, axis=-1) < 0.25 * contrast).mean() > 0.1
        assert (np.linalg.norm(pix - bg, axis=-1) < 0.25 * contrast).mean() > 0.1


def test_colour_histogram_does_not_give_the_class_away(dataset) -> None:
    images, labels = dataset
    bins = np.clip((images * 4).astype(int), 0, 3)
    codes = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).reshape(len(images), -1)
    hist = np.stack([np.bincount(c, minlength=64) for c in codes]) / codes.shape[1]
    assert nearest_centroid_accuracy(hist, labels) < 0.2  # chance is 0.1


def test_shape_features_do_separate_the_classes(dataset) -> None:
    images, labels = dataset
    features = []
    for img in images:
        fg = foreground(img)
        perimeter = (fg[1:] != fg[:-1]).sum() + (fg[:, 1:] != fg[:, :-1]).sum()
        pts = np.argwhere(fg)
        radii = np.linalg.norm(pts - pts.mean(0), axis=1)
        cy, cx = np.round(pts.mean(0)).astype(int)
        features.append(
            [
                np.log(perimeter**2 / fg.sum()),  # compactness: low for a disc, high for textures
                fg.sum() / (np.pi * np.percentile(radii, 98) ** 2),  # how much of its circle the object fills
                fg[cy - 1 : cy + 2, cx - 1 : cx + 2].mean(),  # filled centre (not for a ring)
                radii.std() / radii.mean(),
            ]
        )
    assert nearest_centroid_accuracy(np.array(features), labels) > 0.5  # chance is 0.1
