"""CPU cost of multi-crop per core: biodino's split pipeline vs a plain torchvision-PIL DINOv2 pipeline.

biodino's workers decode (JPEG draft when the crops allow) and cut the 2 + 8 crops as uint8; colour
jitter, grayscale, blur, solarize and normalization run batched on the GPU. The reference does all of
it per image on the CPU, as facebookresearch/dinov2's DataAugmentationDINO does. One thread, same JPEGs.

    python benchmarks/data_pipeline.py [--images 48] [--width 500 --height 375] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from biodino.data.multicrop import MultiCrop
from biodino.data.synthetic import jpeg_bytes, photo
from biodino.config.schema import CropsConfig


def reference_pipeline(cfg: CropsConfig):
    """DINOv2's per-image CPU augmentation, with the documented blur probabilities."""
    jitter = T.Compose([T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)],
                                      p=cfg.jitter_p), T.RandomGrayscale(p=cfg.grayscale_p)])
    norm = T.Compose([T.ToTensor(), T.Normalize(cfg.normalize_mean, cfg.normalize_std)])

    def view(size, scale, blur_p, solarize_p=0.0):
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(cfg.flip_p), jitter,
                          T.RandomApply([T.GaussianBlur(cfg.blur_kernel_size, cfg.blur_sigma)], p=blur_p),
                          T.RandomSolarize(cfg.solarize_threshold, p=solarize_p), norm])

    g1 = view(cfg.global_size, cfg.global_scale, cfg.blur_p[0])
    g2 = view(cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p)
    loc = view(cfg.local_size, cfg.local_scale, cfg.blur_p[2])

    def run(data: bytes):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [g1(img), g2(img)], [loc(img) for _ in range(cfg.num_local)]

    return run


def rate(fn, images: list[bytes], repeats: int) -> float:
    """Best-of-``repeats`` images per second."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            fn(data)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = CropsConfig()
    images = [jpeg_bytes(photo(i, args.width, args.height), quality=90) for i in range(args.images)]
    ours = MultiCrop(cfg)
    rng = np.random.default_rng(0)
    r_ours = rate(lambda d: ours(d, rng), images, args.repeats)
    r_ref = rate(reference_pipeline(cfg), images, args.repeats)
    print(f"{args.images} JPEGs {args.width}x{args.height}, {cfg.global_size}/{cfg.local_size} px, "
          f"2 + {cfg.num_local} crops, 1 thread")
    print(f"biodino CPU side (decode + crops, uint8):   {r_ours:8.1f} images/s per core")
    print(f"torchvision-PIL DINOv2 pipeline (all CPU): {r_ref:8.1f} images/s per core")
    print(f"ratio: {r_ours / r_ref:.2f}x")


if __name__ == "__main__":
    main()
