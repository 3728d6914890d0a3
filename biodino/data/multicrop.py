"""The CPU half of multi-crop: decode (reduced-size JPEG draft when every crop allows), random-resized
crops and flips, as uint8 tensors. Photometric augmentation runs batched on the device (photometric.py).

Crops are resized bicubically; under ``crops.policy: birder`` each global crop is resized bilinearly or bicubically
at random (p 0.5, birder's ``RandomResizedCropWithRandomInterpolation``), drawn after the flips so that the dinov2
policy's stream is unchanged. birder flips a global crop after its op chain, here before: the chain's affine ops
have mirror-symmetric distributions and its colour ops commute with a flip, so the distribution is the same."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from biodino.data.decode import oriented_size, to_rgb
from biodino.config.schema import CropsConfig

RATIO = (3.0 / 4.0, 4.0 / 3.0)
Box = tuple[float, float, float, float]  # left, top, right, bottom in source pixels


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = RATIO) -> Box:
    """torchvision's RandomResizedCrop sampling: area fraction in ``scale``, log-uniform aspect ratio,
    10 tries, then a center crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    w, h = width, height
    if in_ratio < ratio[0]:
        h = round(w / ratio[0])
    elif in_ratio > ratio[1]:
        w = round(h * ratio[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class MultiCrop:
    """bytes -> ``{"global_crops": [2 x (3, G, G)], "local_crops": [n x (3, L, L)]}`` uint8, seeded per sample."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.cfg = cfg
        self.plan = [(cfg.global_size, cfg.global_scale)] * 2 + [(cfg.local_size, cfg.local_scale)] * cfg.num_local
        self.random_global_interpolation = cfg.policy == "birder"

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict[str, list[torch.Tensor]]:
        with Image.open(io.BytesIO(data)) as img:
            width, height = oriented_size(img)  # crops are drawn on the picture as displayed
            boxes = [random_resized_crop_box(width, height, scale, rng) for _, scale in self.plan]
            flips = rng.random(len(self.plan)) < self.cfg.flip_p
            resample = [Image.Resampling.BICUBIC] * len(self.plan)
            if self.random_global_interpolation:
                resample[:2] = [Image.Resampling.BILINEAR if u < 0.5 else Image.Resampling.BICUBIC
                                for u in rng.random(2)]
            img = _decode(img, boxes, [size for size, _ in self.plan])
            sx, sy = img.width / width, img.height / height
            crops = []
            for (size, _), (l, t, r, b), flip, how in zip(self.plan, boxes, flips, resample):
                crop = img.resize((size, size), how, box=(l * sx, t * sy, r * sx, b * sy))
                if flip:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crops.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
        return {"global_crops": crops[:2], "local_crops": crops[2:]}


def _decode(img: Image.Image, boxes: list[Box], sizes: list[int]) -> Image.Image:
    """Upright 8-bit RGB pixels (``decode.to_rgb``), decoded by the JPEG draft at the largest reduction that keeps
    every crop at >= its output size."""
    if img.format == "JPEG":
        factor = min(min(r - l, b - t) / size for (l, t, r, b), size in zip(boxes, sizes))
        if factor >= 2:
            img.draft("RGB", (math.ceil(img.width / factor), math.ceil(img.height / factor)))
    return to_rgb(img)
