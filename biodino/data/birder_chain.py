"""The birder policy's global-crop augmentation: birder 0.8.4's own random op chain (``BirderAugment``), batched
on the device; every op's result truncated to a 0-255 level, as birder's uint8 tensors are."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from biodino.data.colour_ops import (_EPS, _EYE, _GRAY_ROWS, GRAY_WEIGHTS, _constant, _per_sample, adjust_hue,
                                     gaussian_kernels)


# Every op the chain can pick; a level offers the first 4 (levels 1-2), 11 (3-4) or all 12 (5-10).
BIRDER_OPS = ("identity", "rotate", "brightness", "contrast_hue", "saturation", "translate", "shear", "posterize",
              "blur", "autocontrast", "sharpness", "solarize")
_SHARPEN = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # torchvision's sharpness kernel, times 13


class BirderLevel(NamedTuple):
    """Magnitudes of birder's global-crop op chain at ``--aug-level`` L (birder 0.8.4 ``BirderAugment``, in
    ``birder/data/transforms/classification.py``): each crop applies a number of ops uniform in [min_ops, max_ops],
    each op uniform over ``ops`` (repeats allowed), then its flip."""

    level: int
    ops: tuple[str, ...]
    min_ops: int  # 2
    max_ops: int  # max(2, (L + 1) // 2)
    degrees: float  # rotate: angle U(-d, d), d = 2.25 L; nearest, black fill
    brightness: float  # factor U(1 - b, 1 + b), b = 0.2 + 0.0125 L
    contrast: float  # contrast_hue: contrast U(1 - c, 1 + c), c = 0.05 + 0.025 L, and hue
    hue: float  # U(-h, h) turns, h = max(0, 0.0125 L - 0.025), in random order (ColorJitter)
    saturation: float  # factor clamp(1 + U(-s, s), 0.1, 2), s = 0.07 L
    translate: float  # round(U(-t, t) * side) pixels on each axis, t = 0.02 L; nearest, black fill
    shear: float  # x shear U(-a, a) degrees, a = 2.5 L; nearest, black fill
    posterize_bits: int  # 9 - (L + 1) // 2
    blur_kernel_size: int  # ((L + 1) // 4) * 2 + 1, sigma U(blur_sigma), reflect padding
    blur_sigma: tuple[float, float]  # (0.5, 1.2)
    sharpness: float  # factor clamp(f + U(-0.2, 0.2), 1, 2), f = 1 + 0.04 L
    sharpness_spread: float  # 0.2
    solarize_threshold: int  # t + randint(-r, r) levels, t = 255 - 12 L, r = int(0.3 t)
    solarize_spread: int


def birder_level(level: int) -> BirderLevel:
    """The chain at ``--aug-level`` ``level`` in 1..10 (0 in birder is a plain resize without the chain)."""
    if not 1 <= level <= 10:
        raise ValueError(f"crops.aug_level must be in [1, 10], got {level}")
    ops = BIRDER_OPS[:4] + (BIRDER_OPS[4:11] if level >= 3 else ()) + (BIRDER_OPS[11:] if level >= 5 else ())
    threshold = 255 - 12 * level
    return BirderLevel(level=level, ops=ops, min_ops=2, max_ops=max(2, (level + 1) // 2), degrees=2.25 * level,
                       brightness=0.2 + 0.0125 * level, contrast=0.05 + 0.025 * level,
                       hue=max(0.0, -0.025 + 0.0125 * level), saturation=level * 0.07, translate=0.02 * level,
                       shear=2.5 * level, posterize_bits=9 - (level + 1) // 2,
                       blur_kernel_size=((level + 1) // 4) * 2 + 1, blur_sigma=(0.5, 1.2), sharpness=1 + level * 0.04,
                       sharpness_spread=0.2, solarize_threshold=threshold, solarize_spread=int(threshold * 0.3))


class BirderChainParams(NamedTuple):
    """The chain's random draws for N crops and S = max_ops stages, each (N, S) unless noted."""

    count: torch.Tensor  # (N,) long: the crop's number of ops, in [min_ops, max_ops]
    ops: torch.Tensor  # long: index into the level's ops; 0 (identity) past the crop's number of ops
    angle: torch.Tensor  # rotation, degrees
    translate: torch.Tensor  # (N, S, 2) shift (x, y) in whole pixels
    shear: torch.Tensor  # x shear, degrees
    brightness: torch.Tensor
    contrast: torch.Tensor
    hue: torch.Tensor
    hue_first: torch.Tensor  # bool: contrast_hue rotates the hue before the contrast
    saturation: torch.Tensor
    sigma: torch.Tensor
    sharpness: torch.Tensor
    threshold: torch.Tensor  # solarize threshold in 0-255 levels (integer valued)


class _StagePlan(NamedTuple):
    """The per-crop coefficients of one stage of the chain (small tensors; N crops)."""

    theta: torch.Tensor  # (N, 2, 3) affine_grid matrix: rotate, translate, shear, else the identity
    colour: torch.Tensor  # (N,) bool: brightness, saturation, contrast (first) or autocontrast
    matrix: torch.Tensor  # (N, 3, 3) brightness, saturation and contrast matrices (autocontrast's: per image)
    contrast: torch.Tensor  # (N,) the luma's weight in the bias: 1 - f for contrast (first), else 0
    autocontrast: torch.Tensor  # (N,) float 0/1
    step: torch.Tensor  # (N,) truncation step in levels: 2^(8 - bits) for posterize, else 1
    hue: torch.Tensor  # (N,) bool: contrast_hue's hue rotation
    shift: torch.Tensor  # (N,) its shift in turns
    second: torch.Tensor  # (N,) bool: contrast_hue's contrast after the hue
    second_factor: torch.Tensor  # (N,)
    filtered: torch.Tensor  # (N,) bool: blur or sharpness
    sharpen: torch.Tensor  # (N,) bool
    kernel: torch.Tensor  # (N, K, K) blur, sharpness or identity kernel
    offset: torch.Tensor  # (N,) rounding offset after the filter: 0.5 for the blur (rounds), else _EPS (truncates)
    threshold: torch.Tensor  # (N,) solarize threshold in levels; 512 (never) for the other crops


class BirderChain:
    """birder's global-crop op chain at one ``--aug-level``, batched, on float crops in 0-255 levels.

    Each crop applies one op per stage. Every kernel of a stage runs on all crops, and a crop's own op decides what
    the kernel does to it (an identity matrix, grid or kernel, or a ``where``). So there is no sync, and the cost
    does not grow with the number of ops:

    affine warp (rotate, translate, shear) -> colour matrix (brightness, saturation, contrast, autocontrast) ->
    truncation with a step (posterize) -> hue, then the contrast after it (contrast_hue) -> convolution (blur,
    sharpness) -> solarize.

    birder runs the chain on uint8 tensors (its default ``tv`` image loader). So each op's result is truncated here
    too (the blur's is rounded), to a whole level. The affine ops are those of torchvision's tensor ``affine``: the
    same inverse matrix about the centre, nearest sampling, black outside the crop. They run here with the rest of
    the chain, not in the CPU workers, because their order among the colour ops matters (a later autocontrast or
    contrast sees the black fill)."""

    def __init__(self, level: int) -> None:
        self.level = birder_level(level)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator,
             device: torch.device) -> BirderChainParams:
        """The chain's parameters for n crops of height x width, one ``uniform_`` from ``generator``."""
        lv = self.level
        stages, choices, counts = lv.max_ops, len(lv.ops), lv.max_ops - lv.min_ops + 1
        u = torch.empty(n, 1 + 14 * stages, device=device).uniform_(generator=generator)
        count = u[:, 0].mul(counts).floor_().clamp_(max=counts - 1).add_(lv.min_ops)
        v = u[:, 1:].view(n, stages, 14)
        live = torch.arange(stages, device=device) < count[:, None]
        ops = torch.where(live, v[..., 0].mul(choices).floor_().clamp_(max=choices - 1), 0.0).long()

        def span(i: int, low: float, high: float) -> torch.Tensor:
            return v[..., i].mul(high - low).add_(low)

        t, r = lv.translate, lv.solarize_spread
        shift = torch.stack((span(2, -t * width, t * width), span(3, -t * height, t * height)), dim=-1).round_()
        sharpness = span(11, lv.sharpness - lv.sharpness_spread, lv.sharpness + lv.sharpness_spread)
        threshold = v[..., 12].mul(2 * r + 1).floor_().clamp_(max=2 * r).add_(lv.solarize_threshold - r)
        return BirderChainParams(
            count=count.long(), ops=ops, angle=span(1, -lv.degrees, lv.degrees), translate=shift,
            shear=span(4, -lv.shear, lv.shear), brightness=span(5, max(0.0, 1.0 - lv.brightness), 1.0 + lv.brightness),
            contrast=span(6, max(0.0, 1.0 - lv.contrast), 1.0 + lv.contrast), hue=span(7, -lv.hue, lv.hue),
            hue_first=v[..., 8] < 0.5, saturation=span(9, 1.0 - lv.saturation, 1.0 + lv.saturation).clamp_(0.1, 2.0),
            sigma=span(10, *lv.blur_sigma), sharpness=sharpness.clamp_(1.0, 2.0),
            threshold=threshold.clamp_(0.0, 255.0))

    def __call__(self, x: torch.Tensor, p: BirderChainParams) -> torch.Tensor:
        """The chain on float crops (N, 3, H, W) whose values are 0-255 levels (a uint8 crop as float)."""
        if x.shape[0] == 0:
            return x
        plan = self._plan(p, x.shape[-2], x.shape[-1])
        for s in range(self.level.max_ops):
            x = self._stage(x, _StagePlan(*(t[:, s] for t in plan)))
        return x

    def _plan(self, p: BirderChainParams, h: int, w: int) -> _StagePlan:
        """The coefficients of every stage at once, each (N, S, ...)."""
        lv, device = self.level, p.angle.device
        onehot = p.ops[..., None] == torch.arange(len(lv.ops), device=device)  # (N, S, ops)
        none = torch.zeros_like(p.hue_first)

        def rows(name: str) -> torch.Tensor:
            return onehot[..., lv.ops.index(name)] if name in lv.ops else none

        zero = torch.zeros_like(p.angle)
        angle = torch.where(rows("rotate"), p.angle, zero).deg2rad()
        tan = torch.where(rows("shear"), p.shear, zero).deg2rad().tan()
        tx, ty = torch.where(rows("translate")[..., None], p.translate, 0.0).unbind(-1)
        cos, sin = angle.cos(), angle.sin()
        # torchvision's rotation-shear [[a, b], [c, d]] (no y shear) and the inverse map output -> input pixels, about
        # the centre and after the shift: [[d, -b], [-c, a]] (x - t); then in grid_sample's units (half sides)
        a, b, c, d = cos, -cos * tan - sin, sin, cos - sin * tan
        theta = torch.stack((d, -b * (h / w), (b * ty - d * tx) * (2.0 / w),
                             -c * (w / h), a, (c * tx - a * ty) * (2.0 / h)), dim=-1).unflatten(-1, (2, 3))
        brightness, saturation, autocontrast = rows("brightness"), rows("saturation"), rows("autocontrast")
        contrast_hue = rows("contrast_hue")
        hue = contrast_hue if lv.hue > 0 else none
        first = contrast_hue & ~(p.hue_first & hue)
        eye, gray = _constant(_EYE, device), _constant(_GRAY_ROWS, device)
        f = torch.where(brightness, p.brightness, torch.where(saturation, p.saturation, p.contrast))[..., None, None]
        matrix = torch.where(saturation[..., None, None], f * eye + (1.0 - f) * gray, f * eye)
        matrix = torch.where((brightness | saturation | first)[..., None, None], matrix, 0.0)
        size = max(3, lv.blur_kernel_size)
        blur, sharpen = rows("blur"), rows("sharpness")
        if "blur" in lv.ops:
            g = F.pad(gaussian_kernels(p.sigma, lv.blur_kernel_size), ((size - lv.blur_kernel_size) // 2,) * 2)
            centre = size // 2
            delta = _constant(tuple(tuple(float(i == j == centre) for j in range(size)) for i in range(size)), device)
            smooth = F.pad(_constant(_SHARPEN, device) / 13.0, ((size - 3) // 2,) * 4)
            k = torch.where(sharpen, p.sharpness, 1.0)[..., None, None]  # 1: the identity kernel
            sharp = (1.0 - k) * smooth + k * delta
            kernel = torch.where(blur[..., None, None], g[..., :, None] * g[..., None, :], sharp)
        else:
            kernel = torch.zeros(*p.ops.shape, size, size, device=device)
        step = float(2 ** (8 - lv.posterize_bits))
        return _StagePlan(
            theta=theta, colour=brightness | saturation | first | autocontrast, matrix=matrix,
            contrast=torch.where(first, 1.0 - p.contrast, 0.0), autocontrast=autocontrast.float(),
            step=torch.where(rows("posterize"), step, 1.0), hue=hue, shift=torch.where(hue, p.hue, 0.0),
            second=hue & p.hue_first, second_factor=p.contrast, filtered=blur | sharpen, sharpen=sharpen, kernel=kernel,
            offset=torch.where(blur, 0.5, _EPS), threshold=torch.where(rows("solarize"), p.threshold, 512.0))

    def _stage(self, x: torch.Tensor, c: _StagePlan) -> torch.Tensor:
        n, _, h, w = x.shape
        # rotate, translate, shear; the other crops' identity grid samples their own pixels
        grid = F.affine_grid(c.theta, [n, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        x = self._colour(x, c)
        x = x.add_(_EPS).div_(_per_sample(c.step)).floor_().mul_(_per_sample(c.step))  # truncation; posterize
        if self.level.hue > 0:
            x = torch.where(_per_sample(c.hue), adjust_hue(x, c.shift), x).add_(_EPS).floor_()
            f = c.second_factor
            luma = torch.matmul(x.mean(dim=(-2, -1)), _constant(GRAY_WEIGHTS, x.device))  # (N,)
            blended = torch.addcmul(_per_sample((1.0 - f) * luma), x, _per_sample(f)).clamp_(0.0, 255.0)
            x = torch.where(_per_sample(c.second), blended, x).add_(_EPS).floor_()
        if "blur" in self.level.ops:
            x = self._filter(x, c)
        if "solarize" in self.level.ops:
            x = torch.where(x >= _per_sample(c.threshold - _EPS), 255.0 - x, x)
        return x

    @staticmethod
    def _colour(x: torch.Tensor, c: _StagePlan) -> torch.Tensor:
        """clamp(M x + b, 0, 255) per crop: brightness, saturation, contrast (b: (1 - f) times the mean luma) and
        autocontrast (each channel (x - low) * 255 / (high - low); a flat channel as it is)."""
        means = x.mean(dim=(-2, -1))  # (N, 3)
        luma = torch.matmul(means, _constant(GRAY_WEIGHTS, x.device))
        low, high = torch.aminmax(x.flatten(-2), dim=-1)  # (N, 3) each
        flat = high == low
        scale = torch.where(flat, 1.0, 255.0 / (high - low).clamp_min(1e-6)) * c.autocontrast[:, None]
        bias = (c.contrast * luma)[:, None] - torch.where(flat, 0.0, low * scale)
        matrix = c.matrix + torch.diag_embed(scale)
        blended = torch.baddbmm(bias[..., None], matrix, x.flatten(-2)).clamp_(0.0, 255.0).view_as(x)
        return torch.where(_per_sample(c.colour), blended, x)

    def _filter(self, x: torch.Tensor, c: _StagePlan) -> torch.Tensor:
        """blur and sharpness: a per-crop K x K convolution (reflect padding). Sharpness keeps the border pixels and
        blends the interior with its 3 x 3 smoothing by a factor >= 1, as torchvision's ``adjust_sharpness``; the
        blur's result is rounded to levels, the sharpness' truncated."""
        n, _, h, w = x.shape
        size = c.kernel.shape[-1]
        pad = size // 2
        padded = F.pad(x.reshape(1, n * 3, h, w), (pad, pad, pad, pad), mode="reflect")
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, benchmark_limit=cudnn.benchmark_limit,
                         deterministic=cudnn.deterministic, allow_tf32=False):  # fp32: identity kernels stay exact
            out = F.conv2d(padded, c.kernel[:, None].expand(n, 3, size, size).reshape(n * 3, 1, size, size),
                           groups=n * 3).view(n, 3, h, w)
        keep = _per_sample(~c.filtered) | (_per_sample(c.sharpen) & _border(h, w, x.device))
        return torch.where(keep, x, out.clamp_(0.0, 255.0)).add_(_per_sample(c.offset)).floor_()


@functools.cache
def _border(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W) bool: the outermost pixels of an image."""
    border = torch.ones(height, width, dtype=torch.bool, device=device)
    border[1:-1, 1:-1] = False
    return border
