"""Colour and filter ops on batches of float images in [0, 1] with one factor per sample, each matching
``torchvision.transforms.v2.functional`` on a single image: the kernels both augmentation policies are made of."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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


_EPS = 1e-3  # in 0-255 levels: float rounding slack when a value is truncated to, or compared with, a level


def _to_level(x: torch.Tensor) -> torch.Tensor:
    """Down to the 0-255 level below, as torchvision's uint8 colour ops truncate their float results."""
    return x.mul(255.0).add_(_EPS).floor_().div_(255.0)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x
