"""Device-side photometric augmentation of multi-crop batches (DINOv2 recipe), per-sample random parameters.

The CPU workers produce uint8 crops (geometry only); this module applies, per crop and in this order, color
jitter (torchvision ``ColorJitter`` semantics, random op order per sample), grayscale, Gaussian blur,
solarize (global crop 2 only) and normalization, batched on whatever device the crops live on. Every op
works on float images in [0, 1] with one factor per sample and matches ``torchvision.transforms.v2.functional``
on a single image. Randomness comes only from the caller's ``torch.Generator``; nothing synchronizes
the device (random choices are applied with ``torch.where``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from biodino.config.schema import CropsConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # color-jitter op ids, the column order of the factors

# (rows, blur probability, solarize probability) of one group of crops
Group = tuple[int, float, float]


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    """(N,) factors -> (N, 1, 1, 1), to broadcast over (N, C, H, W) images."""
    return f.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of RGB images, with torchvision's weights and arithmetic."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f * x + (1 - f) * other, clamped to [0, 1]: the shared form of brightness, contrast, saturation."""
    f = _per_sample(f)
    return (x * f + other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Scale intensities by a per-sample factor (torchvision ``adjust_brightness``)."""
    return (x * _per_sample(f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grayscale level of each image (torchvision ``adjust_contrast``)."""
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image (torchvision ``adjust_saturation``)."""
    return _blend(x, grayscale(x), f)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, all in [0, 1], the formulas of torchvision's ``_rgb_to_hsv`` (hue 0 where r = g = b)."""
    r, g, _ = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    delta = maxc - minc
    flat = delta == 0  # no hue and no saturation: keep the divisions finite
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    dist = (maxc.unsqueeze(-3) - x) / torch.where(flat, torch.ones_like(delta), delta).unsqueeze(-3)
    rc, gc, bc = dist.unbind(dim=-3)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h.mul(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


# For each hue sector i (rows r, g, b; columns i = 0..5): which of (v, p, q, t) the channel takes.
_SECTOR_CHANNELS = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB for (N, 3, H, W), the sector formulas of torchvision's ``_hsv_to_rgb``."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * frac)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s + s * frac)).clamp_(0.0, 1.0)
    table = torch.tensor(_SECTOR_CHANNELS, dtype=torch.long, device=hsv.device)
    select = table[:, sector.long().remainder_(6)].movedim(0, -3)  # (N, 3, H, W) indices into (v, p, q, t)
    return torch.stack((v, p, q, t), dim=-3).gather(-3, select)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by a per-sample shift in [-0.5, 0.5] turns (torchvision ``adjust_hue``)."""
    h, s, v = rgb_to_hsv(x).unbind(dim=-3)
    h = (h + f.view(-1, 1, 1)).remainder_(1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


_JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) normalized 1-D Gaussian kernels, one per sigma (torchvision's ``_get_gaussian_kernel1d``)."""
    lim = (size - 1) / (2.0 * 2.0 ** 0.5)
    pos = torch.linspace(-lim, lim, steps=size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-(pos / sigma.unsqueeze(-1)).pow(2), dim=-1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding, as one grouped convolution per axis."""
    n, c, h, w = x.shape
    weight = gaussian_kernels(sigma, size).repeat_interleave(c, dim=0)  # (N * C, size)
    pad = size // 2
    out = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, weight.view(n * c, 1, 1, size), groups=n * c)
    out = F.conv2d(out, weight.view(n * c, 1, size, 1), groups=n * c)
    return out.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (in [0, 1]), as torchvision ``solarize`` on float images."""
    return torch.where(x >= threshold, 1.0 - x, x)


class PhotometricParams(NamedTuple):
    """The random draws for N crops: which ops apply, jitter factors and order, blur sigmas."""

    jitter: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (N, 4) long, a permutation of the jitter op ids: stage k applies order[:, k]
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) float
    solarize: torch.Tensor  # (N,) bool


class Photometric:
    """Device-side photometric augmentation of uint8 crops, DINOv2 recipe, per-sample random parameters."""

    def __init__(self, cfg: CropsConfig) -> None:
        self.cfg = cfg
        for name in ("brightness", "contrast", "saturation"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"crops.{name} must be >= 0, got {getattr(cfg, name)}")
        if not 0.0 <= cfg.hue <= 0.5:
            raise ValueError(f"crops.hue must be in [0, 0.5], got {cfg.hue}")
        if cfg.blur_kernel_size % 2 == 0 or cfg.blur_kernel_size < 1:
            raise ValueError(f"crops.blur_kernel_size must be odd and positive, got {cfg.blur_kernel_size}")
        strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
        # Factor ranges of torchvision's ColorJitter; ops with zero strength are skipped, as there.
        self._low = [max(0.0, 1.0 - v) for v in strengths] + [-cfg.hue]
        self._high = [1.0 + v for v in strengths] + [cfg.hue]
        self._enabled = [i for i, v in enumerate((*strengths, cfg.hue)) if v > 0]
        inverted = cfg.blur_reference_inverted
        self._blur_p = tuple(1.0 - p if inverted else p for p in cfg.blur_p)

    def __call__(self, global_crops: torch.Tensor, local_crops: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment and normalize crop-major global (2B rows) and local crops; draws globals first, then locals."""
        if global_crops.shape[0] % 2:
            raise ValueError(f"global_crops must hold 2B rows (crop-major), got {global_crops.shape[0]}")
        global_groups, local_groups = self._groups(global_crops.shape[0] // 2, local_crops.shape[0])
        return (self._augment(global_crops, global_groups, generator),
                self._augment(local_crops, local_groups, generator))

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> float32 normalized, no augmentation (for evaluation)."""
        return self._normalize(_to_unit(crops))

    def _groups(self, b: int, n_local: int) -> tuple[list[Group], list[Group]]:
        """Row groups with their blur and solarize probabilities: (global 1, global 2), (locals,)."""
        p1, p2, p_local = self._blur_p
        return [(b, p1, 0.0), (b, p2, self.cfg.solarize_p)], [(n_local, p_local, 0.0)]

    def _augment(self, crops: torch.Tensor, groups: list[Group], generator: torch.Generator) -> torch.Tensor:
        """Draw parameters for the rows of ``crops`` and apply them; the output is normalized float32."""
        x = _to_unit(crops)
        if x.shape[0] == 0:
            return self._normalize(x)
        return self._normalize(self._apply(x, self._sample(groups, generator, x.device)))

    def _sample(self, groups: list[Group], generator: torch.Generator, device: torch.device) -> PhotometricParams:
        """Per-sample random parameters for the concatenated groups, all from ``generator``."""
        n = sum(rows for rows, _, _ in groups)
        blur_p = torch.cat([torch.full((rows,), p, device=device) for rows, p, _ in groups])
        solarize_p = torch.cat([torch.full((rows,), p, device=device) for rows, _, p in groups])
        u = torch.rand(n, 5, generator=generator, device=device)
        order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)  # uniform permutations
        low = torch.tensor(self._low, device=device)
        high = torch.tensor(self._high, device=device)
        factors = low + (high - low) * torch.rand(n, 4, generator=generator, device=device)
        s_low, s_high = self.cfg.blur_sigma
        return PhotometricParams(jitter=u[:, 0] < self.cfg.jitter_p, factors=factors, order=order,
                                 gray=u[:, 1] < self.cfg.grayscale_p, blur=u[:, 2] < blur_p,
                                 sigma=s_low + (s_high - s_low) * u[:, 3], solarize=u[:, 4] < solarize_p)

    def _apply(self, x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        """Jitter, grayscale, blur, solarize float images in [0, 1] as ``params`` say (the DINOv2 order)."""
        x = self._jitter(x, params)
        x = torch.where(_per_sample(params.gray), grayscale(x).expand_as(x), x)
        x = torch.where(_per_sample(params.blur), gaussian_blur(x, params.sigma, self.cfg.blur_kernel_size), x)
        return torch.where(_per_sample(params.solarize), solarize(x, self.cfg.solarize_threshold / 255.0), x)

    def _jitter(self, x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        """Color jitter in 4 stages; at stage k each jittered sample applies the op ``order[:, k]`` names."""
        for stage in range(4):
            op = torch.where(params.jitter, params.order[:, stage], -1)
            for i in self._enabled:
                x = torch.where(_per_sample(op == i), _JITTER_OPS[i](x, params.factors[:, i]), x)
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for float images in [0, 1]."""
        mean = torch.tensor(self.cfg.normalize_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.normalize_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _to_unit(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> float32 in [0, 1] (x / 255)."""
    if crops.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8, got {crops.dtype}")
    return crops.to(torch.float32).div_(255.0)
