"""Device-side photometric augmentation: each op against torchvision, the full recipe against a per-sample
torchvision reference built from the drawn parameters, and the frequencies of the random choices."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from biodino.data.colour_ops import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, gaussian_blur, grayscale, hsv_to_rgb, rgb_to_hsv, solarize
from biodino.data.photometric import Photometric, PhotometricParams
from biodino.config.schema import CropsConfig

ATOL = 1e-5
# Every probability off: the starting point of the tests that switch on one choice at a time.
OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


def _cfg(**changes: object) -> CropsConfig:
    return dataclasses.replace(CropsConfig(), **changes)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random float images in [0, 1], with some saturated and flat pixels to hit the edge cases."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, :, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 0.25]).view(1, 1, 4)  # gray pixels (r = g = b)
    x[:, 0, 1, 0], x[:, 1, 1, 0], x[:, 2, 1, 0] = 1.0, 0.0, 0.0  # pure red
    return x


def _uint8(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _check_op(ours, theirs, factors: list[float]) -> None:
    """ours(batch, (N,) factors) must equal theirs(image, factor) image by image."""
    x = _images(len(factors))
    out = ours(x, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(x[i], f), atol=ATOL, rtol=0)


def test_brightness_matches_torchvision() -> None:
    _check_op(adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.17, 1.4, 3.0])


def test_contrast_matches_torchvision() -> None:
    _check_op(adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 0.93, 1.0, 1.4, 3.0])


def test_saturation_matches_torchvision() -> None:
    _check_op(adjust_saturation, TF.adjust_saturation, [0.0, 0.8, 1.0, 1.13, 1.2, 3.0])


def test_hue_matches_torchvision() -> None:
    _check_op(adjust_hue, TF.adjust_hue, [-0.5, -0.1, -0.037, 0.0, 0.05, 0.1, 0.29, 0.5])


def test_hue_matches_torchvision_on_uint8_levels_and_ties() -> None:
    """Quantized images: many pixels with two equal max or min channels (sector edges) and gray pixels."""
    x = torch.randint(0, 8, (12, 3, 12, 12), generator=torch.Generator().manual_seed(0)).float() * (255 / 7) / 255
    factors = torch.linspace(-0.5, 0.5, 12)
    out = adjust_hue(x, factors)
    for i, f in enumerate(factors.tolist()):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], f), atol=ATOL, rtol=0)


def test_hsv_is_in_range_and_round_trips() -> None:
    x = _images(8)
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv[:, 0].max() < 1 and hsv[:, 1:].max() <= 1
    assert torch.equal(hsv[:, 0, 0, :4], torch.zeros(8, 4))  # gray pixels: hue 0
    assert torch.equal(hsv[:, 1, 0, :4], torch.zeros(8, 4))  # ... and saturation 0
    torch.testing.assert_close(hsv[:, :, 1, 0], torch.tensor([0.0, 1.0, 1.0]).expand(8, 3))  # pure red
    torch.testing.assert_close(hsv_to_rgb(hsv), x, atol=ATOL, rtol=0)


def test_grayscale_matches_torchvision() -> None:
    x = _images(4)
    out = grayscale(x).expand_as(x)
    for i in range(4):
        torch.testing.assert_close(out[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=ATOL, rtol=0)


def test_blur_matches_torchvision() -> None:
    sigmas = [0.1, 0.5, 1.0, 1.37, 2.0]
    x = _images(len(sigmas), size=12)
    out = gaussian_blur(x, torch.tensor(sigmas), 9)
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [9, 9], [s, s]), atol=ATOL, rtol=0)


def test_solarize_matches_torchvision() -> None:
    x = _images(3)
    x[:, :, 2, :2] = torch.tensor([127 / 255, 128 / 255])  # just below / at the threshold
    torch.testing.assert_close(solarize(x, 128 / 255), TF.solarize(x, 128 / 255), atol=0, rtol=0)
    assert torch.allclose(solarize(x, 128 / 255)[:, :, 2, :2], torch.tensor([127 / 255, 127 / 255]))


def _reference(x: torch.Tensor, p: PhotometricParams, cfg: CropsConfig) -> torch.Tensor:
    """One image through torchvision's functional ops, as the drawn parameters say (DINOv2 order)."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if p.jitter:
        for op in p.order.tolist():
            x = ops[op](x, float(p.factors[op]))
    if p.gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur:
        s = float(p.sigma)
        x = TF.gaussian_blur(x, [cfg.blur_kernel_size] * 2, [s, s])
    if p.solarize:
        x = TF.solarize(x, cfg.solarize_threshold / 255)
    return TF.normalize(x, list(cfg.normalize_mean), list(cfg.normalize_std))


def _row(params: PhotometricParams, i: int) -> PhotometricParams:
    return PhotometricParams(*(t[i] for t in params))


def test_call_matches_per_sample_torchvision_reference() -> None:
    # Probabilities near 1/2 so that every combination of choices occurs among the crops.
    cfg = _cfg(jitter_p=0.7, grayscale_p=0.3, blur_p=(0.5, 0.5, 0.5), solarize_p=0.5)
    aug, b, n_local = Photometric(cfg), 24, 2
    global_crops, local_crops = _uint8(2 * b, 16, 1), _uint8(n_local * b, 12, 2)
    out_global, out_local = aug(global_crops, local_crops, torch.Generator().manual_seed(7))

    # Redraw the same parameters: globals first, then locals, from the same seed.
    gen = torch.Generator().manual_seed(7)
    global_groups, local_groups = aug._groups(b, n_local * b)
    params_global = aug._sample(global_groups, gen, torch.device("cpu"))
    params_local = aug._sample(local_groups, gen, torch.device("cpu"))
    assert params_global.jitter.any() and params_global.gray.any() and params_global.solarize[b:].any()
    assert not params_global.solarize[:b].any() and not params_local.solarize.any()
    assert sorted(params_global.order[0].tolist()) == [0, 1, 2, 3]
    for crops, out, params in ((global_crops, out_global, params_global), (local_crops, out_local, params_local)):
        for i in range(crops.shape[0]):
            expected = _reference(crops[i].float() / 255, _row(params, i), cfg)
            torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0, msg=f"crop {i}")


def test_jitter_order_is_per_sample_permutation() -> None:
    """With jitter always on, each sample's output is its drawn ops in its drawn order (and order matters)."""
    cfg = _cfg(**{**OFF, "jitter_p": 1.0})
    aug = Photometric(cfg)
    x = _images(64)
    params = aug._sample([(64, 0.0, 0.0)], torch.Generator().manual_seed(3), torch.device("cpu"))
    out = aug._apply(x, params)
    orders = {tuple(o) for o in params.order.tolist()}
    assert len(orders) > 12  # many of the 24 permutations occur
    for i in range(64):
        expected = x[i]
        for op in params.order[i].tolist():
            expected = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op](
                expected, float(params.factors[i, op]))
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    # The reversed order gives a different image, so the order is really being followed.
    reversed_params = params._replace(order=params.order.flip(1))
    assert (aug._apply(x, reversed_params) - out).abs().amax() > 1e-3


def test_factor_ranges() -> None:
    aug = Photometric(CropsConfig())
    params = aug._sample([(20000, 0.5, 0.0)], torch.Generator().manual_seed(0), torch.device("cpu"))
    lows, highs = [0.6, 0.6, 0.8, -0.1], [1.4, 1.4, 1.2, 0.1]
    for j in range(4):
        f = params.factors[:, j]
        assert f.min() >= lows[j] and f.max() <= highs[j]
        assert f.min() < lows[j] + 0.01 and f.max() > highs[j] - 0.01  # fills the range
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0


def test_all_probabilities_zero_is_plain_normalization() -> None:
    aug = Photometric(_cfg(**OFF))
    global_crops, local_crops = _uint8(8, 16, 0), _uint8(12, 8, 1)
    out_global, out_local = aug(global_crops, local_crops, torch.Generator().manual_seed(0))
    assert torch.equal(out_global, aug.normalize(global_crops))
    assert torch.equal(out_local, aug.normalize(local_crops))
    mean = torch.tensor(CropsConfig().normalize_mean).view(1, 3, 1, 1)
    std = torch.tensor(CropsConfig().normalize_std).view(1, 3, 1, 1)
    torch.testing.assert_close(aug.normalize(global_crops), (global_crops.float() / 255 - mean) / std)


def test_crops_with_every_choice_off_are_exactly_normalized() -> None:
    """The identity steps (inactive blend slots, unrotated hue, delta blur kernels) change no bit of a crop."""
    aug = Photometric(_cfg(jitter_p=0.5, grayscale_p=0.5, blur_p=(0.5, 0.5, 0.5), solarize_p=0.5))
    global_crops, local_crops = _uint8(64, 16, 3), _uint8(64, 12, 4)
    out_global, out_local = aug(global_crops, local_crops, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    global_groups, local_groups = aug._groups(32, 64)
    for crops, out, groups in ((global_crops, out_global, global_groups), (local_crops, out_local, local_groups)):
        p = aug._sample(groups, gen, torch.device("cpu"))
        plain = ~(p.jitter | p.gray | p.blur | p.solarize)
        assert plain.sum() >= 3
        assert torch.equal(out[plain], aug.normalize(crops[plain]))


def test_jitter_parameters_are_per_sample() -> None:
    aug = Photometric(_cfg(**{**OFF, "jitter_p": 1.0}))
    crops = _uint8(1, 16, 0).expand(16, -1, -1, -1).contiguous()
    out, _ = aug(crops, crops[:0], torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3  # no two identical inputs give the same output


def _binomial_ok(hits: torch.Tensor, p: float) -> bool:
    """Whether the observed frequency of a (N,) bool is within 4 standard deviations of p."""
    n = hits.numel()
    return abs(hits.float().mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n)


def _changed(out: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """Per crop: whether the augmented output differs from plain normalization."""
    return (out - plain).abs().flatten(1).amax(1) > 1e-4


B, N_LOCAL = 2000, 2  # 4000 global and 4000 local 8x8 crops per statistics test


def _run_stats(cfg: CropsConfig, global_crops: torch.Tensor, local_crops: torch.Tensor,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Photometric]:
    aug = Photometric(cfg)
    out_global, out_local = aug(global_crops, local_crops, torch.Generator().manual_seed(seed))
    return out_global[:B], out_global[B:], out_local, aug


def test_solarize_only_on_global_crop_2() -> None:
    crops = torch.full((2 * B, 3, 8, 8), 200, dtype=torch.uint8)  # above the threshold: solarize is visible
    g1, g2, loc, aug = _run_stats(_cfg(**{**OFF, "solarize_p": 0.2}), crops, crops[: N_LOCAL * B])
    plain = aug.normalize(crops[:1])
    assert not _changed(g1, plain).any() and not _changed(loc, plain).any()
    hits = _changed(g2, plain)
    assert _binomial_ok(hits, 0.2)
    torch.testing.assert_close(g2[hits][:1], aug.normalize(torch.full((1, 3, 8, 8), 55, dtype=torch.uint8)))


@pytest.mark.parametrize("inverted, expected", [(False, (1.0, 0.1, 0.5)), (True, (0.0, 0.9, 0.5))])
def test_blur_frequencies(inverted: bool, expected: tuple[float, float, float]) -> None:
    # Sigmas near 0.1 barely change an image; draw from [1, 2] so that every blur is visible.
    cfg = _cfg(**{**OFF, "blur_p": (1.0, 0.1, 0.5)}, blur_sigma=(1.0, 2.0), blur_reference_inverted=inverted)
    global_crops, local_crops = _uint8(2 * B, 8, 0), _uint8(N_LOCAL * B, 8, 1)
    g1, g2, loc, aug = _run_stats(cfg, global_crops, local_crops)
    plains = aug.normalize(global_crops[:B]), aug.normalize(global_crops[B:]), aug.normalize(local_crops)
    for out, plain, p in zip((g1, g2, loc), plains, expected):
        assert _binomial_ok(_changed(out, plain), p), (inverted, p, _changed(out, plain).float().mean())


def test_grayscale_frequency() -> None:
    global_crops, local_crops = _uint8(2 * B, 8, 0), _uint8(N_LOCAL * B, 8, 1)
    g1, g2, loc, aug = _run_stats(_cfg(**{**OFF, "grayscale_p": 0.2}), global_crops, local_crops)
    for out in (g1, g2, loc):
        unit = out * torch.tensor(CropsConfig().normalize_std).view(1, 3, 1, 1) + torch.tensor(
            CropsConfig().normalize_mean).view(1, 3, 1, 1)
        gray = (unit - unit[:, :1]).abs().flatten(1).amax(1) < 1e-5
        assert _binomial_ok(gray, 0.2), gray.float().mean()


def test_jitter_frequency() -> None:
    global_crops, local_crops = _uint8(2 * B, 8, 0), _uint8(N_LOCAL * B, 8, 1)
    g1, g2, loc, aug = _run_stats(_cfg(**{**OFF, "jitter_p": 0.8}), global_crops, local_crops)
    plains = aug.normalize(global_crops[:B]), aug.normalize(global_crops[B:]), aug.normalize(local_crops)
    for out, plain in zip((g1, g2, loc), plains):
        assert _binomial_ok(_changed(out, plain), 0.8), _changed(out, plain).float().mean()


def test_same_seed_reproduces_and_different_seeds_differ() -> None:
    aug = Photometric(CropsConfig())
    global_crops, local_crops = _uint8(8, 16, 0), _uint8(16, 8, 1)
    a = aug(global_crops, local_crops, torch.Generator().manual_seed(5))
    b = aug(global_crops, local_crops, torch.Generator().manual_seed(5))
    c = aug(global_crops, local_crops, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_dtype_shapes_and_zero_local_crops() -> None:
    aug = Photometric(CropsConfig())
    global_crops, local_crops = _uint8(6, 16, 0), _uint8(12, 8, 1)
    out_global, out_local = aug(global_crops, local_crops, torch.Generator().manual_seed(0))
    assert out_global.dtype == out_local.dtype == torch.float32
    assert out_global.shape == global_crops.shape and out_local.shape == local_crops.shape
    assert out_global.device == global_crops.device and torch.isfinite(out_global).all()
    out_global, out_local = aug(global_crops, local_crops[:0], torch.Generator().manual_seed(0))
    assert out_global.shape == global_crops.shape and out_local.shape == (0, 3, 8, 8)
    assert out_local.dtype == torch.float32


def test_rejects_bad_inputs() -> None:
    aug = Photometric(CropsConfig())
    with pytest.raises(TypeError):
        aug.normalize(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError):
        aug(_uint8(3, 8, 0), _uint8(0, 8, 0), torch.Generator())
    with pytest.raises(ValueError):
        Photometric(_cfg(hue=0.6))
