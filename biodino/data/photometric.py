"""Device-side photometric augmentation of multi-crop batches (DINOv2 recipe), per-sample random parameters.

The CPU workers produce uint8 crops (geometry only); this module applies, per crop and in this order, color
jitter (torchvision ``ColorJitter`` semantics, random op order per sample), grayscale, Gaussian blur,
solarize (global crop 2 only) and normalization, batched on whatever device the crops live on. Every op
works on float images in [0, 1] with one factor per sample and matches ``torchvision.transforms.v2.functional``
on a single image. Randomness comes only from the caller's ``torch.Generator``; nothing synchronizes the device.

Every crop runs the same short list of batched kernels, per-sample coefficients deciding what each one does (a
random choice that is off makes its step the identity), so the cost does not grow with the number of choices:

- brightness, contrast and saturation are per-sample affine maps of the channels, clamp(M x + b, 0, 1), one
  batched 3x3 matmul each. A sample's op order is a permutation with hue at some stage h, so the jitter is 3 "pre"
  blend slots (stage j < h), one hue rotation for all samples, then 3 "post" slots (stage j > h);
- the hue rotation works on the hexcone (value, chroma, hue in sixths of a turn) without branches per sector;
- grayscale is folded into the horizontal blur pass (both are linear and per pixel along a row), one grouped
  convolution mixing the channels of each sample; unblurred samples get a delta kernel, exactly the identity.

The identity steps are exact in float32. The blur convolutions run without TF32 (cuDNN would use it by default,
rounding every crop, blurred or not, by 2^-11); the blend matmuls follow ``torch.backends.cuda.matmul`` (fp32
unless a script asks for TF32, as birder's does).

``crops.policy: birder`` (birder 0.8.4's ``train_dino_v2`` / ``train_franca`` transforms) changes the structure:

- both global crops go through birder's own op chain (``BirderChain``, ``crops.aug_level``);
- the local crops get the jitter and the blur above, with no grayscale and no solarize;
- every op's result is truncated to a 0-255 level (the blur's rounded), as birder's uint8 tensors are.

Its statistics are checked against birder's transforms in tests/oracle/test_augmentation_vs_birder.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from biodino.config.schema import CROP_POLICIES, CropsConfig

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # color-jitter op ids, the column order of the factors

# (rows, blur probability, solarize probability) of one group of crops
Group = tuple[int, float, float]

# The 6 blend slots of the jitter: stages 0, 1, 2 before the hue, then stages 1, 2, 3 after it. Slot i is active iff
# hue_stage * _SLOT_SIGN[i] > _SLOT_KEY[i], i.e. stage j < hue stage (pre slots) or stage j > hue stage (post slots).
_SLOT_SIGN = (1, 1, 1, -1, -1, -1)
_SLOT_KEY = (0, 1, 2, -1, -2, -3)
# Hue numerators (g - b, b - r, r - g) for a max channel r, g, b; hexcone phase n of the channels r, g, b.
_HUE_DIFFERENCES = ((0.0, 1.0, -1.0), (-1.0, 0.0, 1.0), (1.0, -1.0, 0.0))
_HUE_PHASES = ((5.0,), (3.0,), (1.0,))
_EYE = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
_GRAY_ROWS = (GRAY_WEIGHTS,) * 3  # 1 w^T: every channel becomes the luma


@functools.cache
def _constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor, made once per device and dtype: no host-to-device copy per call."""
    return torch.tensor(values, dtype=dtype, device=device)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    """(N,) factors -> (N, 1, 1, 1), to broadcast over (N, C, H, W) images."""
    return f.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of RGB images, with torchvision's weights and arithmetic."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)


@functools.cache
def _blend_table(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, intercept), each (4 ops, 4, 3): op o with factor f has coefficients slope[o] * f + intercept[o].

    Rows 0-2 are the channel matrix M, row 3 the contrast row c (bias c . mean(x)), w = GRAY_WEIGHTS:
    brightness M = f I; contrast M = f I, c = (1 - f) w; saturation M = f I + (1 - f) 1 w^T; hue (the identity
    in a blend slot) M = I.
    """
    eye, gray = torch.tensor(_EYE, dtype=torch.float64), torch.tensor(_GRAY_ROWS, dtype=torch.float64)
    zero, w = torch.zeros_like(eye), gray[:1]
    slope = [(eye, zero[:1]), (eye, -w), (eye - gray, zero[:1]), (zero, zero[:1])]
    intercept = [(zero, zero[:1]), (zero, w), (gray, zero[:1]), (eye, zero[:1])]
    slope_t, intercept_t = (torch.stack([torch.cat(rows) for rows in table]) for table in (slope, intercept))
    return slope_t.to(device, dtype), intercept_t.to(device, dtype)


def _blend(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """clamp(M x + c . mean(x), 0, 1) per sample, coefficients (N, 4, 3) = [M; c]: any of the three blend ops."""
    flat = x.flatten(-2)  # (N, 3, H * W)
    bias = torch.bmm(coefficients[:, 3:], flat.mean(dim=-1, keepdim=True))  # (N, 1, 1)
    return torch.baddbmm(bias, coefficients[:, :3], flat).clamp_(0.0, 1.0).view_as(x)


def _blend_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One blend op with per-sample factors, through the pipeline's slot arithmetic."""
    slope, intercept = _blend_table(x.device, x.dtype)
    return _blend(x, torch.addcmul(intercept[op], f.view(-1, 1, 1), slope[op]))


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Scale intensities by a per-sample factor (torchvision ``adjust_brightness``)."""
    return _blend_op(x, BRIGHTNESS, f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the mean grayscale level of each image (torchvision ``adjust_contrast``)."""
    return _blend_op(x, CONTRAST, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image (torchvision ``adjust_saturation``)."""
    return _blend_op(x, SATURATION, f)


def _hexcone(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, chroma, hue in sixths of a turn, in [-1, 5]) of RGB images, each (N, 1, H, W).

    torchvision's ``_rgb_to_hsv`` formulas: the first max channel (priority r, g, b) picks the sector, and the hue
    is 0 where chroma is 0 (r = g = b).
    """
    v, top = x.max(dim=-3, keepdim=True)  # indices of the first maximal value
    delta = v - x.amin(dim=-3, keepdim=True)
    differences = torch.matmul(_constant(_HUE_DIFFERENCES, x.device, x.dtype), x.flatten(-2)).view_as(x)
    h6 = differences.gather(-3, top).div_(delta.clamp_min(torch.finfo(x.dtype).tiny))  # in [-1, 1]; 0 if delta = 0
    return v, delta, h6.add_(top, alpha=2)


def _from_hexcone(v: torch.Tensor, delta: torch.Tensor, h6: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """RGB from value, chroma and hue h6 (sixths of a turn) plus a (3, 1, 1) or (N, 3, 1, 1) per-channel phase.

    channel = v - delta * clamp(min(k, 4 - k), 0, 1) with k = (h6 + phase) mod 6, phase = n + hue shift and n = 5,
    3, 1 for r, g, b: the sector formulas of torchvision's ``_hsv_to_rgb`` in closed form (continuous in the hue).
    """
    k = (h6 + phase).remainder_(6.0)
    return torch.addcmul(v, delta, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, all in [0, 1], the formulas of torchvision's ``_rgb_to_hsv`` (hue 0 where r = g = b)."""
    v, delta, h6 = _hexcone(x)
    s = delta / v.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.cat((h6.div_(6.0).add_(1.0).fmod_(1.0), s, v), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB for (N, 3, H, W), torchvision's ``_hsv_to_rgb`` in closed form."""
    h, s, v = hsv.split(1, dim=-3)
    return _from_hexcone(v, v * s, h * 6.0, _constant(_HUE_PHASES, hsv.device, hsv.dtype).unsqueeze(-1))


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by a per-sample shift in [-0.5, 0.5] turns (torchvision ``adjust_hue``)."""
    phase = torch.add(_constant(_HUE_PHASES, x.device, x.dtype).unsqueeze(-1), _per_sample(f), alpha=6.0)
    return _from_hexcone(*_hexcone(x), phase)


@functools.cache
def _half_squares(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size,) -t^2 / 2 at the taps t = -(size - 1) / 2 .. (size - 1) / 2 of a Gaussian kernel."""
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return (-0.5 * t * t).to(device, dtype)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size) normalized 1-D Gaussian kernels, one per sigma (torchvision's ``_get_gaussian_kernel1d``)."""
    return torch.softmax(_half_squares(size, sigma.device, sigma.dtype) / sigma.square().unsqueeze(-1), dim=-1)


def _separable_blur(x: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Reflect-padded separable convolution of (N, 3, H, W) images, per-sample kernels of odd size K.

    horizontal (N, 3, 3, K) also mixes the channels of each sample (grayscale goes there), vertical (N, 3, K) is per
    channel: one grouped convolution per axis.
    """
    n, c, h, w = x.shape
    size = horizontal.shape[-1]
    pad = size // 2
    out = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, benchmark_limit=cudnn.benchmark_limit,
                     deterministic=cudnn.deterministic, allow_tf32=False):  # fp32: identity kernels stay exact
        out = F.conv2d(out, horizontal.reshape(n * c, c, 1, size), groups=n)
        out = F.conv2d(out, vertical.reshape(n * c, 1, size, 1), groups=n * c)
    return out.view(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflect padding, as one grouped convolution per axis."""
    k = gaussian_kernels(sigma, size)
    eye = _constant(_EYE, x.device, x.dtype)
    return _separable_blur(x, eye[..., None] * k[:, None, None], k[:, None].expand(-1, 3, -1))


def solarize(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (in [0, 1], or per sample), as torchvision ``solarize``."""
    return torch.where(x >= threshold, 1.0 - x, x)


# --- The birder policy's global crops: birder's own op chain (``BirderAugment``), batched. ---

# Every op the chain can pick; a level offers the first 4 (levels 1-2), 11 (3-4) or all 12 (5-10).
BIRDER_OPS = ("identity", "rotate", "brightness", "contrast_hue", "saturation", "translate", "shear", "posterize",
              "blur", "autocontrast", "sharpness", "solarize")
_EPS = 1e-3  # in 0-255 levels: float rounding slack when a value is truncated to, or compared with, a level
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


class PhotometricParams(NamedTuple):
    """The random draws for N crops: which ops apply, jitter factors and order, blur sigmas."""

    jitter: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (N, 4) long, a permutation of the jitter op ids: stage k applies order[:, k]
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) float
    solarize: torch.Tensor  # (N,) bool


class _Coefficients(NamedTuple):
    """What the image ops do to each of N crops, derived from their ``PhotometricParams``."""

    slots: torch.Tensor  # (N, 6, 4, 3) [M; c] of the blend slots: stages 0-2 before the hue, 1-3 after it
    jitter: torch.Tensor  # (N,) bool: the hue rotation applies
    hue: torch.Tensor  # (N,) hue shift
    horizontal: torch.Tensor  # (N, 3, 3, K) grayscale (or identity) times the horizontal blur (or delta) kernel
    vertical: torch.Tensor  # (N, 3, K) vertical blur (or delta) kernel
    solarize: torch.Tensor  # (N,) solarize threshold, 2 (never) where not solarized

    def rows(self, start: int, stop: int | None) -> "_Coefficients":
        """The coefficients of rows start:stop (views)."""
        return _Coefficients(*(t[start:stop] for t in self))


@functools.cache
def _probabilities(groups: tuple[Group, ...], jitter_p: float, grayscale_p: float,
                   device: torch.device) -> torch.Tensor:
    """(N, 5) probabilities the uniform draws are compared with: jitter, grayscale, blur, (sigma: unused), solarize."""
    rows = [torch.tensor([jitter_p, grayscale_p, blur_p, 0.0, solarize_p]).expand(n, 5) for n, blur_p, solarize_p
            in groups]
    return torch.cat(rows).to(device)


class Photometric:
    """Device-side photometric augmentation of uint8 crops, per-sample random parameters: the DINOv2 recipe, or
    birder's (``crops.policy``)."""

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
        # Factor ranges of torchvision's ColorJitter (an op with zero strength gets factor 1, the identity).
        self._low = (*(max(0.0, 1.0 - v) for v in strengths), -cfg.hue)
        self._high = (*(1.0 + v for v in strengths), cfg.hue)
        inverted = cfg.blur_reference_inverted
        self._blur_p = tuple(1.0 - p if inverted else p for p in cfg.blur_p)
        if cfg.policy not in CROP_POLICIES:
            raise ValueError(f"crops.policy must be one of {', '.join(CROP_POLICIES)}, got {cfg.policy!r}")
        self.chain: BirderChain | None = None  # the birder policy's global-crop op chain
        # birder's ops run on uint8 tensors: under its policy every op's result is truncated to a 0-255 level (the
        # blur's rounded), here too; an op that does not apply leaves a value on a level, and truncating it keeps it
        self._levels = cfg.policy == "birder"
        if cfg.policy == "birder":
            if cfg.aug_level is None:
                raise ValueError("crops.policy birder needs crops.aug_level (birder's --aug-level, 5 in its scripts)")
            self.chain = BirderChain(cfg.aug_level)

    def __call__(self, global_crops: torch.Tensor, local_crops: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment and normalize crop-major global (2B rows) and local crops; draws globals first, then locals."""
        if global_crops.shape[0] % 2:
            raise ValueError(f"global_crops must hold 2B rows (crop-major), got {global_crops.shape[0]}")
        if self.chain is not None:
            return self._birder(global_crops, local_crops, generator)
        n = global_crops.shape[0]
        global_groups, local_groups = self._groups(n // 2, local_crops.shape[0])
        coefficients = self._coefficients(self._draw([global_groups, local_groups], generator, global_crops.device))
        return (self._augment(global_crops, global_groups, coefficients.rows(0, n)),
                self._augment(local_crops, local_groups, coefficients.rows(n, None)))

    def _birder(self, global_crops: torch.Tensor, local_crops: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The birder policy: both global crops through birder's op chain; the local crops through the jitter (with
        ``jitter_p``) and blur (with ``blur_p[2]``) of this module, birder's ``RandomApply`` pair. Draws: the chain's,
        then the locals'."""
        assert self.chain is not None
        n, _, h, w = global_crops.shape
        device = global_crops.device
        chain_params = self.chain.draw(n, h, w, generator, device)
        global_out = self._normalize(self.chain(global_crops.float(), chain_params).div_(255.0))
        if local_crops.shape[0] == 0:  # crops.num_local 0
            return global_out, self.normalize(local_crops)
        local_groups = [(local_crops.shape[0], self._blur_p[2], 0.0)]
        local_params = self._draw([local_groups], generator, device)
        return global_out, self._augment(local_crops, local_groups, self._coefficients(local_params))

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> float32 normalized, no augmentation (for evaluation)."""
        return self._normalize(_to_unit(crops))

    def _groups(self, b: int, n_local: int) -> tuple[list[Group], list[Group]]:
        """Row groups with their blur and solarize probabilities: (global 1, global 2), (locals,)."""
        p1, p2, p_local = self._blur_p
        return [(b, p1, 0.0), (b, p2, self.cfg.solarize_p)], [(n_local, p_local, 0.0)]

    def _augment(self, crops: torch.Tensor, groups: list[Group], coefficients: _Coefficients) -> torch.Tensor:
        """Augment uint8 crops with their rows' coefficients; the output is normalized float32."""
        x = self._transform(_to_unit(crops), coefficients, can_solarize=any(p > 0 for _, _, p in groups))
        return self._normalize(x)

    def _sample(self, groups: list[Group], generator: torch.Generator, device: torch.device) -> PhotometricParams:
        """Per-sample random parameters for the concatenated groups, all from ``generator``."""
        return self._draw([groups], generator, device)

    def _draw(self, parts: list[list[Group]], generator: torch.Generator, device: torch.device) -> PhotometricParams:
        """The parameters that one ``_sample`` call per part, in order, would draw (same stream), concatenated.

        Each part draws (rows, 5) uniforms for the choices and sigma, (rows, 4) for the op order, (rows, 4) for the
        factors, into one buffer laid out so that every kind of draw is one (N, width) tensor for all parts.
        """
        sizes = [sum(rows for rows, _, _ in groups) for groups in parts]
        n = sum(sizes)
        draws = torch.empty(13 * n, device=device).split((5 * n, 4 * n, 4 * n))
        start = 0
        for size in sizes:
            for block, width in zip(draws, (5, 4, 4)):
                block[width * start:width * (start + size)].uniform_(generator=generator)
            start += size
        u, ranks, fractions = (block.view(n, -1) for block in draws)
        low = _constant(self._low, device)
        factors = low + (_constant(self._high, device) - low) * fractions
        hits = u < _probabilities(tuple(g for groups in parts for g in groups), self.cfg.jitter_p,
                                  self.cfg.grayscale_p, device)
        s_low, s_high = self.cfg.blur_sigma
        return PhotometricParams(jitter=hits[:, 0], factors=factors, order=ranks.argsort(dim=1),  # uniform order
                                 gray=hits[:, 1], blur=hits[:, 2], sigma=s_low + (s_high - s_low) * u[:, 3],
                                 solarize=hits[:, 4])

    def _coefficients(self, params: PhotometricParams) -> _Coefficients:
        """Per-sample coefficients of the image ops, from the parameters (small tensors, a few ops for all rows)."""
        device, n, size = params.order.device, params.order.shape[0], self.cfg.blur_kernel_size
        hue_stage = params.order.argsort(dim=1)[:, HUE:]  # (N, 1): the inverse permutation's hue entry
        stage_ops = torch.cat((params.order[:, :3], params.order[:, 1:]), dim=1)  # the op of each slot's stage
        active = (hue_stage * _constant(_SLOT_SIGN, device, torch.long) > _constant(_SLOT_KEY, device, torch.long))
        ops = torch.where(active & params.jitter[:, None], stage_ops, _constant(HUE, device, torch.long))
        slope, intercept = _blend_table(device, params.factors.dtype)
        table = torch.addcmul(intercept, params.factors[..., None, None], slope)  # (N, 4 ops, 4, 3)
        slots = table.gather(1, ops[..., None, None].expand(n, 6, 4, 3))
        delta = _constant(tuple(float(i == size // 2) for i in range(size)), device)
        kernels = torch.where(params.blur[:, None], gaussian_kernels(params.sigma, size), delta)
        mix = torch.where(params.gray[:, None, None], _constant(_GRAY_ROWS, device), _constant(_EYE, device))
        threshold = _constant((self.cfg.solarize_threshold / 255.0, 2.0), device)
        return _Coefficients(slots=slots, jitter=params.jitter, hue=params.factors[:, HUE],
                             horizontal=mix[..., None] * kernels[:, None, None],
                             vertical=kernels[:, None].expand(n, 3, size),
                             solarize=torch.where(params.solarize, threshold[0], threshold[1]))

    def _apply(self, x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        """Jitter, grayscale, blur, solarize float images in [0, 1] as ``params`` say (the DINOv2 order)."""
        return self._transform(x, self._coefficients(params))

    def _transform(self, x: torch.Tensor, c: _Coefficients, can_solarize: bool = True) -> torch.Tensor:
        """The image ops on float images in [0, 1]; ``can_solarize=False`` skips solarize (no row of x has it)."""
        if x.shape[0] == 0:
            return x
        level = _to_level if self._levels else _same
        for slot in range(3):
            x = level(_blend(x, c.slots[:, slot]))
        if self.cfg.hue > 0:
            x = level(torch.where(_per_sample(c.jitter), adjust_hue(x, c.hue), x))
        for slot in range(3, 6):
            x = level(_blend(x, c.slots[:, slot]))
        x = _separable_blur(x, c.horizontal, c.vertical)
        if self._levels:
            x = x.mul(255.0).round_().div_(255.0)  # torchvision's uint8 blur rounds
        return solarize(x, _per_sample(c.solarize)) if can_solarize else x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for float images in [0, 1]."""
        mean, std = self.cfg.normalize_mean, self.cfg.normalize_std
        scale = _constant(tuple(1.0 / s for s in std), x.device, x.dtype).view(1, 3, 1, 1)
        shift = _constant(tuple(-m / s for m, s in zip(mean, std)), x.device, x.dtype).view(1, 3, 1, 1)
        return torch.addcmul(shift, x, scale)


def _to_level(x: torch.Tensor) -> torch.Tensor:
    """Down to the 0-255 level below, as torchvision's uint8 colour ops truncate their float results."""
    return x.mul(255.0).add_(_EPS).floor_().div_(255.0)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _to_unit(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> float in [0, 1], x / 255 in the default float dtype (float32): one kernel."""
    if crops.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8, got {crops.dtype}")
    return torch.div(crops, 255.0)
