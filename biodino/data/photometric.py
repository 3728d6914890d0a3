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

from biodino.config.schema import CROP_POLICIES, CropsConfig
from biodino.data.birder_chain import BirderChain
from biodino.data.colour_ops import (HUE, _EYE, _GRAY_ROWS, _SLOT_KEY, _SLOT_SIGN, Group, _blend, _blend_table,
                                     _constant, _per_sample, _same, _separable_blur, _to_level, adjust_hue,
                                     gaussian_kernels, solarize)

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


def _to_unit(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> float in [0, 1], x / 255 in the default float dtype (float32): one kernel."""
    if crops.dtype != torch.uint8:
        raise TypeError(f"crops must be uint8, got {crops.dtype}")
    return torch.div(crops, 255.0)
