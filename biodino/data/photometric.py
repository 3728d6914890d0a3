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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from biodino.config.schema import CropsConfig

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
        # Factor ranges of torchvision's ColorJitter (an op with zero strength gets factor 1, the identity).
        self._low = (*(max(0.0, 1.0 - v) for v in strengths), -cfg.hue)
        self._high = (*(1.0 + v for v in strengths), cfg.hue)
        inverted = cfg.blur_reference_inverted
        self._blur_p = tuple(1.0 - p if inverted else p for p in cfg.blur_p)

    def __call__(self, global_crops: torch.Tensor, local_crops: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment and normalize crop-major global (2B rows) and local crops; draws globals first, then locals."""
        if global_crops.shape[0] % 2:
            raise ValueError(f"global_crops must hold 2B rows (crop-major), got {global_crops.shape[0]}")
        n = global_crops.shape[0]
        global_groups, local_groups = self._groups(n // 2, local_crops.shape[0])
        coefficients = self._coefficients(self._draw([global_groups, local_groups], generator, global_crops.device))
        return (self._augment(global_crops, global_groups, coefficients.rows(0, n)),
                self._augment(local_crops, local_groups, coefficients.rows(n, None)))

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
        for slot in range(3):
            x = _blend(x, c.slots[:, slot])
        if self.cfg.hue > 0:
            x = torch.where(_per_sample(c.jitter), adjust_hue(x, c.hue), x)
        for slot in range(3, 6):
            x = _blend(x, c.slots[:, slot])
        x = _separable_blur(x, c.horizontal, c.vertical)
        return solarize(x, _per_sample(c.solarize)) if can_solarize else x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for float images in [0, 1]."""
        mean, std = self.cfg.normalize_mean, self.cfg.normalize_std
        scale = _constant(tuple(1.0 / s for s in std), x.device, x.dtype).view(1, 3, 1, 1)
        shift = _constant(tuple(-m / s for m, s in zip(mean, std)), x.device, x.dtype).view(1, 3, 1, 1)
        return torch.addcmul(shift, x, scale)


def _to_unit(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> float in [0, 1], x / 255 in the default float dtype (float32): one kernel."""
    if crops.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8, got {crops.dtype}")
    return torch.div(crops, 255.0)
