"""crops.policy birder against birder 0.8.4's own training transforms, on the same generated images.

birder's side is ``TrainTransform`` of ``train_dino_v2`` (Bio-DINO) and ``train_franca`` (Franca BIOSCAN-5M), built
by the scripts' own parsers from the published commands' augmentation flags (only ``--rgb-mode centered``; every
other flag takes the script's default), at small sizes for speed. Compared over a few hundred draws:

- the settings of the transforms, against the birder values of ``CropsConfig``;
- crop scales (area fraction of the source) of global and local crops;
- the global op chain's op counts, op rates and magnitudes, and the local jitter and blur rates;
- photometric statistics of the crops (brightness shift, contrast, colourfulness, sharpness, black fill, gray and
  unchanged crops), on the same crops, and end to end from the same images.

Means must agree within 4 standard errors of their difference, rates within 4 binomial standard errors, crop-scale
distributions by a two-sample Kolmogorov-Smirnov test at 0.1%. The last test shows the same comparisons reject
DINOv2's recipe and a birder recipe with one probability wrong.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from biodino.config.checks import check_crops_policy
from biodino.config.schema import CropsConfig
from biodino.data import multicrop
from biodino.data.multicrop import MultiCrop
from biodino.data.birder_chain import birder_level
from biodino.data.photometric import Photometric
from biodino.data.synthetic import jpeg_bytes, photo

bc = pytest.importorskip("birder.data.transforms.classification")  # dev extra: always present in CI
training_utils = pytest.importorskip("birder.common.training_utils")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # birder's tv loader

N_IMAGES = 300
GLOBAL, LOCAL, N_LOCAL = 64, 32, 4  # 600 global and 1,200 local crops per run
Z = 4.0  # standard errors
KS = 1.95  # two-sample Kolmogorov-Smirnov critical value at alpha 0.001
SCRIPTS = {"dinov2": ("train_dino_v2", "vit_reg4_so150m_p14_ls", (0.35, 1.0)),
           "franca": ("train_franca", "vit_b16_ls", (0.4, 1.0))}
# The CropsConfig values of the birder policy (CropsConfig's docstring; global_scale by script).
BIRDER = dict(policy="birder", aug_level=5, local_scale=(0.1, 0.35), flip_p=0.5, jitter_p=0.8, brightness=0.25,
              contrast=0.15, saturation=0.0, hue=0.04, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.5), blur_sigma=(0.5, 1.2),
              blur_kernel_size=3, solarize_p=0.0)
SMALL = dict(global_size=GLOBAL, local_size=LOCAL, num_local=N_LOCAL, normalize_mean=(0.5,) * 3,
             normalize_std=(0.5,) * 3)


def _ours(seed: str, **changes: Any) -> CropsConfig:
    cfg = dataclasses.replace(CropsConfig(), **{**BIRDER, "global_scale": SCRIPTS[seed][2], **SMALL, **changes})
    if cfg.policy == "birder":
        check_crops_policy(cfg)
    return cfg


def _birder(seed: str) -> tuple[Any, Any]:
    """(args, TrainTransform) as the script builds them for its published command."""
    script, network, _ = SCRIPTS[seed]
    mod = importlib.import_module(f"birder.scripts.{script}")
    args = mod.get_args_parser().parse_args(
        ["--network", network, "--rgb-mode", "centered", "--size", str(GLOBAL), "--local-crop-size", str(LOCAL),
         "--local-crops-number", str(N_LOCAL), "--data-path", "unused"])
    mod.validate_args(args)
    rgb = bc.get_rgb_stats(args.rgb_mode)
    return args, mod.TrainTransform(training_utils.get_training_transform(args), args.local_crop_size, rgb,
                                    args.local_crops_number)


def _one(transforms: list, kind: type) -> Any:
    found = [t for t in transforms if isinstance(t, kind)]
    assert len(found) == 1, (kind, transforms)
    return found[0]


def _op_name(t: Any) -> str:
    """The name in biodino's ``BIRDER_OPS`` of one transformation of birder's chain."""
    if isinstance(t, v2.RandomAffine):
        return "translate" if t.translate is not None else "shear" if t.shear is not None else "rotate"
    if isinstance(t, v2.ColorJitter):
        return "brightness" if t.brightness is not None else "contrast_hue"
    kinds = {v2.Identity: "identity", bc.RandomSaturationWithVariation: "saturation", v2.RandomPosterize: "posterize",
             v2.GaussianBlur: "blur", v2.RandomAutocontrast: "autocontrast",
             bc.RandomAdjustSharpnessWithVariation: "sharpness", bc.RandomSolarizeWithVariableThreshold: "solarize"}
    for kind, name in kinds.items():
        if type(t) is kind:
            return name
    raise AssertionError(f"birder's chain has an op biodino does not know: {t!r}")


# --- comparisons: each returns None when the two samples agree, else what differs ---

def _same_mean(what: str, a: Any, b: Any) -> Optional[str]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    if abs(a.mean() - b.mean()) <= Z * se + 1e-12:
        return None
    return f"{what}: birder {a.mean():.4f} vs biodino {b.mean():.4f} (n {len(a)}/{len(b)}, 4 SE {Z * se:.4f})"


def _same_rate(what: str, a: Any, b: Any) -> Optional[str]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    if abs(a.mean() - b.mean()) <= Z * se + 1e-12:
        return None
    return f"{what}: birder {a.mean():.3f} vs biodino {b.mean():.3f} (n {len(a)}/{len(b)}, 4 SE {Z * se:.3f})"


def _same_distribution(what: str, a: Any, b: Any) -> Optional[str]:
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate((a, b))
    d = np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    limit = KS * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    return None if d <= limit else f"{what}: KS distance {d:.3f} > {limit:.3f}"


def _within(what: str, values: Any, low: float, high: float, slack: float = 1e-6) -> Optional[str]:
    v = np.asarray(values, dtype=float)
    ok = len(v) > 0 and v.min() >= low - slack and v.max() <= high + slack
    return None if ok else f"{what}: values in [{v.min():.4f}, {v.max():.4f}], not within [{low}, {high}]"


def _check(*problems: Optional[str]) -> None:
    found = [p for p in problems if p]
    assert not found, "\n".join(found)


# --- crop statistics, batched: (N, 3, H, W) floats in [0, 1] ---

def _sharpness(x: torch.Tensor) -> torch.Tensor:
    """Energy of the Laplacian of the luma over its variance: drops with blur, not with brightness or contrast."""
    gray = (x * torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    laplace = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(gray, laplace).square().mean((1, 2, 3)) / gray.var((1, 2, 3)).clamp_min(1e-8)


def _chroma(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1) - x.amin(1)  # (N, H, W)


def _black(x: torch.Tensor) -> torch.Tensor:
    return (x.amax(1) == 0).float().mean((1, 2))


def _hue(x: torch.Tensor) -> torch.Tensor:
    """The angle (turns) of a crop's summed opponent-colour vector: its dominant hue, whatever the pixel layout."""
    r, g, b = x.unbind(1)
    a, c = (r - (g + b) / 2).sum((1, 2)), ((g - b) * math.sqrt(3) / 2).sum((1, 2))
    return torch.atan2(c, a) / (2 * math.pi)


def _absolute(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": x.mean((1, 2, 3)), "std": x.std((1, 2, 3)), "chroma": _chroma(x).mean((1, 2)),
            "log sharpness": _sharpness(x).clamp_min(1e-4).log()}  # a flat (clipped) crop has none


def _changes(before: torch.Tensor, after: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per crop: what its photometric augmentation did (before and after on the same pixels' grid)."""
    sharp = _sharpness(after) / _sharpness(before).clamp_min(1e-8)
    return {"brightness shift": after.mean((1, 2, 3)) - before.mean((1, 2, 3)),
            "contrast ratio": after.std((1, 2, 3)) / before.std((1, 2, 3)).clamp_min(1e-6),
            "colour ratio": _chroma(after).mean((1, 2)) / _chroma(before).mean((1, 2)).clamp_min(1e-6),
            "hue shift": torch.remainder(_hue(after) - _hue(before) + 0.5, 1.0) - 0.5,
            "blurred (sharpness < 0.6x)": (sharp < 0.6).float(), "sharper (> 1.5x)": (sharp > 1.5).float(),
            "black fill gained": (_black(after) - _black(before) > 1e-3).float(),
            "unchanged": ((after - before).abs().amax((1, 2, 3)) < 0.5 / 255).float(),
            "gray": (_chroma(after).amax((1, 2)) < 1.5 / 255).float()}


def _spread(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return np.abs(x - x.mean())


def _compare_changes(where: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> list:
    """Rates for the yes/no statistics; mean and spread (mean absolute deviation) for the others."""
    out = []
    for k, a in theirs.items():
        b = ours[k]
        if bool(((a == 0) | (a == 1)).all()):
            out.append(_same_rate(f"{where} {k}", a, b))
        else:
            out += [_same_mean(f"{where} {k}", a, b), _same_mean(f"{where} {k} spread", _spread(a), _spread(b))]
    return out


def _unit(normalized: torch.Tensor) -> torch.Tensor:
    return normalized * 0.5 + 0.5  # rgb mode centered


# --- the runs ---

@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [jpeg_bytes(photo(7000 + i)) for i in range(N_IMAGES)]


class _Areas:
    """Records the area fraction of each random-resized crop, keyed by output size, on both sides."""

    def __init__(self) -> None:
        self.by_size: dict[int, list[float]] = {}

    def add(self, size: int, fraction: float) -> None:
        self.by_size.setdefault(size, []).append(fraction)


def _birder_areas(monkeypatch: pytest.MonkeyPatch, areas: _Areas) -> None:
    original = v2.RandomResizedCrop.make_params

    def make_params(self: v2.RandomResizedCrop, flat_inputs: list) -> dict:
        params = original(self, flat_inputs)
        h, w = flat_inputs[0].shape[-2:]
        areas.add(self.size[0], params["height"] * params["width"] / (h * w))
        return params

    monkeypatch.setattr(v2.RandomResizedCrop, "make_params", make_params)


def _biodino_areas(monkeypatch: pytest.MonkeyPatch, areas: _Areas, cfg: CropsConfig) -> None:
    original = multicrop.random_resized_crop_box
    sizes = {cfg.global_scale: cfg.global_size, cfg.local_scale: cfg.local_size}

    def box(width: int, height: int, scale: tuple, rng: np.random.Generator, *args: Any) -> tuple:
        left, top, right, bottom = original(width, height, scale, rng, *args)
        areas.add(sizes[scale], (right - left) * (bottom - top) / (width * height))
        return left, top, right, bottom

    monkeypatch.setattr(multicrop, "random_resized_crop_box", box)


def _run_biodino(images: list[bytes], cfg: CropsConfig) -> dict[str, Any]:
    """MultiCrop then Photometric: uint8 crops, augmented crops in [0, 1], area fractions."""
    areas = _Areas()
    with pytest.MonkeyPatch.context() as mp:
        _biodino_areas(mp, areas, cfg)
        crops = [MultiCrop(cfg)(data, np.random.default_rng(i)) for i, data in enumerate(images)]
    g = torch.stack([c for s in crops for c in s["global_crops"]])
    loc = torch.stack([c for s in crops for c in s["local_crops"]])
    aug = Photometric(cfg)
    out_g, out_l = aug(g, loc, torch.Generator().manual_seed(0))
    return {"global": g, "local": loc, "global out": _unit(out_g), "local out": _unit(out_l), "areas": areas,
            "photometric": aug}


@pytest.fixture(scope="module")
def end_to_end(images: list[bytes]) -> dict[str, dict[str, Any]]:
    """Both pipelines from the same JPEG bytes: birder's TrainTransform on the decoded tensor (its default tv loader)
    and biodino's MultiCrop + Photometric; Franca's run is geometry only (the rest is the same as DINOv2's)."""
    out: dict[str, dict[str, Any]] = {}
    for seed in SCRIPTS:
        _, transform = _birder(seed)
        areas, views = _Areas(), []
        torch.manual_seed(0)
        random.seed(0)
        with pytest.MonkeyPatch.context() as mp:
            _birder_areas(mp, areas)
            for data in images:
                x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                if seed == "dinov2":
                    views.append(transform(x))
                else:
                    crop = _one(transform.global_transform.transforms, bc.RandomResizedCropWithRandomInterpolation)
                    crop(x), crop(x)
                    [_one(transform.local_transform.transforms, v2.RandomResizedCrop)(x) for _ in range(N_LOCAL)]
        theirs: dict[str, Any] = {"areas": areas}
        if views:
            theirs["global out"] = _unit(torch.stack([c for v in views for c in v["global_crops"]]))
            theirs["local out"] = _unit(torch.stack([c for v in views for c in v["local_crops"]]))
        out[seed] = {"birder": theirs, "biodino": _run_biodino(images, _ours(seed))}
    return out


class _ChainLog:
    """birder's chain, instrumented: per crop, the ops it applied and their parameters."""

    def __init__(self, augment: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.crops: list[list[tuple[str, dict]]] = []
        augment.transformations = [self._logged(_op_name(t), t) for t in augment.transformations]
        for name in ("adjust_saturation", "adjust_sharpness", "solarize"):  # birder's own ops call these directly
            monkeypatch.setattr(bc.F, name, self._recording(getattr(bc.F, name)))

    def _logged(self, name: str, t: Any) -> Callable:
        if isinstance(t, v2.Transform):
            make_params = t.make_params

            def record(flat_inputs: list) -> dict:
                params = make_params(flat_inputs)
                self.crops[-1][-1][1].update(params)
                return params

            t.make_params = record

        def apply(x: torch.Tensor) -> torch.Tensor:
            self.crops[-1].append((name, {}))
            return t(x)

        return apply

    def _recording(self, fn: Callable) -> Callable:
        def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            value = args[0] if args else next(iter(kwargs.values()))
            self.crops[-1][-1][1]["value"] = float(value)
            return fn(x, *args, **kwargs)

        return call

    def __call__(self, augment: Any, x: torch.Tensor) -> torch.Tensor:
        self.crops.append([])
        return augment(x)


@pytest.fixture(scope="module")
def same_crops(end_to_end: dict) -> dict[str, Any]:
    """The photometric halves on the same uint8 crops (biodino's MultiCrop output): birder's chain and its local
    RandomApply pair crop by crop, instrumented, against biodino's Photometric and its drawn parameters."""
    ours = end_to_end["dinov2"]["biodino"]
    g, loc = ours["global"], ours["local"]
    _, transform = _birder("dinov2")
    augment = _one(transform.global_transform.transforms, bc.BirderAugment)
    jitter, blur = [t for t in transform.local_transform.transforms if isinstance(t, v2.RandomApply)]
    calls = {"jitter": 0, "blur": 0}
    for name, wrapper in (("jitter", jitter), ("blur", blur)):
        inner = wrapper.transforms[0]
        make_params = inner.make_params

        def counted(flat_inputs: list, name: str = name, make_params: Callable = make_params) -> dict:
            calls[name] += 1
            return make_params(flat_inputs)

        inner.make_params = counted
    torch.manual_seed(1)
    with pytest.MonkeyPatch.context() as mp:
        log = _ChainLog(augment, mp)
        chain_out = torch.stack([log(augment, x) for x in g]).float() / 255
    jittered, blurred, local_out = [], [], []
    for x in loc:
        before = dict(calls)
        local_out.append(blur(jitter(x)))
        jittered.append(calls["jitter"] - before["jitter"])
        blurred.append(calls["blur"] - before["blur"])
    aug: Photometric = ours["photometric"]
    gen = torch.Generator().manual_seed(0)  # the draws of the run's call: the chain's, then the locals'
    chain_params = aug.chain.draw(g.shape[0], GLOBAL, GLOBAL, gen, torch.device("cpu"))
    local_params = aug._sample([(loc.shape[0], aug.cfg.blur_p[2], 0.0)], gen, torch.device("cpu"))
    return {"log": log.crops, "chain out": chain_out, "local out": torch.stack(local_out).float() / 255,
            "jittered": jittered, "blurred": blurred, "chain params": chain_params, "local params": local_params,
            "ours": ours}


# --- the tests ---

def test_the_scripts_defaults_are_the_birder_values_of_crops_config() -> None:
    """The transforms the published commands get, object by object, against BIRDER and birder_level(5)."""
    for seed in SCRIPTS:
        args, t = _birder(seed)
        cfg = _ours(seed)
        assert (args.aug_type, args.aug_level, args.use_grayscale, args.simple_crop, args.re_prob) == (
            "birder", cfg.aug_level, False, False, 0.0)
        assert args.resize_min_scale == cfg.global_scale[0] and args.local_crops_number == N_LOCAL
        g = t.global_transform.transforms
        crop = _one(g, bc.RandomResizedCropWithRandomInterpolation)
        assert [c.interpolation for c in crop.transform] == [v2.InterpolationMode.BILINEAR,
                                                             v2.InterpolationMode.BICUBIC]
        assert all(tuple(c.scale) == cfg.global_scale and tuple(c.ratio) == multicrop.RATIO for c in crop.transform)
        augment, flip = _one(g, bc.BirderAugment), _one(g, v2.RandomHorizontalFlip)
        level = birder_level(cfg.aug_level)
        assert flip.p == cfg.flip_p and isinstance(augment.re, v2.Identity)
        assert (augment.min_ops, augment.max_ops) == (level.min_ops, level.max_ops)
        ops = {_op_name(op): op for op in augment.transformations}
        assert sorted(ops) == sorted(level.ops) and len(ops) == len(augment.transformations)
        assert list(ops["rotate"].degrees) == [-level.degrees, level.degrees]
        assert tuple(ops["translate"].translate) == (level.translate,) * 2
        assert list(ops["shear"].shear) == [-level.shear, level.shear, 0.0, 0.0]
        assert list(ops["brightness"].brightness) == pytest.approx([1 - level.brightness, 1 + level.brightness])
        assert list(ops["contrast_hue"].contrast) == pytest.approx([1 - level.contrast, 1 + level.contrast])
        assert list(ops["contrast_hue"].hue) == pytest.approx([-level.hue, level.hue])
        assert (ops["saturation"].factor, ops["saturation"].factor_variation) == pytest.approx((1.0, level.saturation))
        assert ops["posterize"].bits == level.posterize_bits and ops["posterize"].p == 1.0
        assert tuple(ops["blur"].kernel_size) == (level.blur_kernel_size,) * 2
        assert tuple(ops["blur"].sigma) == level.blur_sigma
        assert (ops["sharpness"].factor, ops["sharpness"].factor_variation) == pytest.approx(
            (level.sharpness, level.sharpness_spread))
        solarize = ops["solarize"]
        assert solarize.threshold == level.solarize_threshold
        assert int(solarize.threshold * solarize.threshold_variation) == level.solarize_spread
        normalize = _one(g, v2.Normalize)
        assert tuple(normalize.mean) == cfg.normalize_mean and tuple(normalize.std) == cfg.normalize_std
        local = t.local_transform.transforms
        rrc, jitter_blur = _one(local, v2.RandomResizedCrop), [x for x in local if isinstance(x, v2.RandomApply)]
        assert tuple(rrc.scale) == cfg.local_scale and rrc.interpolation == v2.InterpolationMode.BICUBIC
        assert tuple(rrc.ratio) == multicrop.RATIO and _one(local, v2.RandomHorizontalFlip).p == cfg.flip_p
        (jitter,), (blur,) = (x.transforms for x in jitter_blur)
        assert [x.p for x in jitter_blur] == [cfg.jitter_p, cfg.blur_p[2]]
        assert list(jitter.brightness) == pytest.approx([1 - cfg.brightness, 1 + cfg.brightness])
        assert list(jitter.contrast) == pytest.approx([1 - cfg.contrast, 1 + cfg.contrast])
        assert jitter.saturation is None and cfg.saturation == 0.0
        assert list(jitter.hue) == pytest.approx([-cfg.hue, cfg.hue])
        assert tuple(blur.kernel_size) == (cfg.blur_kernel_size,) * 2 and tuple(blur.sigma) == cfg.blur_sigma
        assert not any(isinstance(x, (v2.RandomGrayscale, v2.RandomSolarize)) for x in g + local)
    _, dino = _birder("dinov2")
    _, franca = _birder("franca")
    assert repr(dino.local_transform) == repr(franca.local_transform)


def test_crop_scales_match_on_the_same_images(end_to_end: dict) -> None:
    problems = []
    for seed, runs in end_to_end.items():
        theirs, ours = runs["birder"]["areas"].by_size, runs["biodino"]["areas"].by_size
        for size, (low, high) in ((GLOBAL, SCRIPTS[seed][2]), (LOCAL, BIRDER["local_scale"])):
            a, b = theirs[size], ours[size]
            assert len(a) == len(b) == N_IMAGES * (2 if size == GLOBAL else N_LOCAL)
            what = f"{seed} {'global' if size == GLOBAL else 'local'} crop area"
            # support: birder's area range, up to the rounding of the crop's sides (3%)
            outside = [float(x < 0.97 * low or x > high * 1.03) for x in b]
            problems += [_same_mean(what, a, b), _same_distribution(what, a, b),
                         _same_rate(f"{what} outside [{low}, {high}]", [0.0] * len(a), outside)]
    _check(*problems)


def test_global_chain_op_counts_rates_and_magnitudes_match(same_crops: dict) -> None:
    log, p = same_crops["log"], same_crops["chain params"]
    level = birder_level(5)
    n = len(log)
    problems = [_same_rate("global crops with 3 ops", [len(c) == 3 for c in log], (p.count == 3).tolist()),
                _within("ops per crop", [len(c) for c in log], 2, 3)]
    ours_ops = [[level.ops[int(p.ops[i, s])] for s in range(int(p.count[i]))] for i in range(n)]
    # magnitudes: birder's parameter per application, ours where the op was drawn
    theirs_values: dict[str, list[float]] = {}
    ours_values: dict[str, list[float]] = {}
    pick = {"rotate": ("rotate", lambda q: q["angle"]), "translate x": ("translate", lambda q: q["translate"][0]),
            "translate y": ("translate", lambda q: q["translate"][1]), "shear": ("shear", lambda q: q["shear"][0]),
            "brightness": ("brightness", lambda q: q["brightness_factor"]),
            "contrast": ("contrast_hue", lambda q: q["contrast_factor"]),
            "hue": ("contrast_hue", lambda q: q["hue_factor"]),
            "hue first": ("contrast_hue", lambda q: float(_hue_first(q["fn_idx"].tolist()))),
            "saturation": ("saturation", lambda q: q["value"]), "blur sigma": ("blur", lambda q: q["sigma"][0]),
            "sharpness": ("sharpness", lambda q: q["value"]), "solarize threshold": ("solarize", lambda q: q["value"])}
    column = {"rotate": p.angle, "translate x": p.translate[..., 0], "translate y": p.translate[..., 1],
              "shear": p.shear, "brightness": p.brightness, "contrast": p.contrast, "hue": p.hue,
              "hue first": p.hue_first.float(), "saturation": p.saturation, "blur sigma": p.sigma,
              "sharpness": p.sharpness, "solarize threshold": p.threshold}
    for what, (op, get) in pick.items():
        theirs_values[what] = [get(q) for crop in log for name, q in crop if name == op]
        k = level.ops.index(op)
        ours_values[what] = [float(column[what][i, s]) for i in range(n) for s in range(int(p.count[i]))
                             if int(p.ops[i, s]) == k]
    for op in level.ops:
        problems.append(_same_rate(f"global crops with {op}", [op in c for c, _ in _names(log)],
                                   [op in c for c in ours_ops]))
    bounds = {"rotate": (-level.degrees, level.degrees), "translate x": (-6.0, 6.0), "translate y": (-6.0, 6.0),
              "shear": (-level.shear, level.shear), "brightness": (1 - level.brightness, 1 + level.brightness),
              "contrast": (1 - level.contrast, 1 + level.contrast), "hue": (-level.hue, level.hue),
              "hue first": (0.0, 1.0), "saturation": (1 - level.saturation, 1 + level.saturation),
              "blur sigma": level.blur_sigma, "sharpness": (1.0, 1.4), "solarize threshold": (137, 253)}
    for what in pick:
        a, b = theirs_values[what], ours_values[what]
        problems += [_same_mean(f"{what} (mean)", a, b), _same_mean(f"{what} (spread)", _spread(a), _spread(b)),
                     _within(f"birder {what}", a, *bounds[what]), _within(f"biodino {what}", b, *bounds[what])]
    _check(*problems)


def _hue_first(order: list[int]) -> bool:
    """ColorJitter's op order (0 brightness, 1 contrast, 2 saturation, 3 hue): the hue before the contrast."""
    return order.index(3) < order.index(1)


def _names(log: list) -> list[tuple[set, int]]:
    return [({name for name, _ in crop}, len(crop)) for crop in log]


def test_photometric_statistics_match_on_the_same_crops(same_crops: dict) -> None:
    """Jitter, blur, sharpening, black fill, gray and unchanged crops: the same uint8 crops through each side."""
    ours, lp = same_crops["ours"], same_crops["local params"]
    g, loc = ours["global"].float() / 255, ours["local"].float() / 255
    problems = _compare_changes("global", _changes(g, same_crops["chain out"]), _changes(g, ours["global out"]))
    problems += _compare_changes("local", _changes(loc, same_crops["local out"]), _changes(loc, ours["local out"]))
    problems += [_same_rate("local crops jittered", same_crops["jittered"], lp.jitter.tolist()),
                 _same_rate("local crops blurred", same_crops["blurred"], lp.blur.tolist()),
                 _same_rate("local crops gray", [0.0] * len(lp.gray), lp.gray.tolist()),
                 _same_rate("local crops solarized", [0.0] * len(lp.solarize), lp.solarize.tolist())]
    _check(*problems)


def test_crops_match_end_to_end_from_the_same_images(end_to_end: dict) -> None:
    """birder's whole TrainTransform against MultiCrop + Photometric: statistics of the crops themselves."""
    theirs, ours = end_to_end["dinov2"]["birder"], end_to_end["dinov2"]["biodino"]
    problems = []
    for kind in ("global", "local"):
        a, b = _absolute(theirs[f"{kind} out"]), _absolute(ours[f"{kind} out"])
        problems += [_same_mean(f"{kind} {k}", a[k], b[k]) for k in a]
        problems.append(_same_rate(f"{kind} with black fill", _black(theirs[f"{kind} out"]) > 1e-3,
                                   _black(ours[f"{kind} out"]) > 1e-3))
        problems.append(_same_rate(f"{kind} gray", _chroma(theirs[f"{kind} out"]).amax((1, 2)) < 1.5 / 255,
                                   _chroma(ours[f"{kind} out"]).amax((1, 2)) < 1.5 / 255))
    _check(*problems)


def test_the_comparisons_reject_dinov2s_recipe_and_wrong_birder_values(images: list[bytes], end_to_end: dict,
                                                                      same_crops: dict) -> None:
    """The power of the tests above. DINOv2's recipe end to end; on the same crops, a birder recipe with one value
    wrong: the local jitter's probability or hue, the local blur's probability, the chain's level."""
    theirs = end_to_end["dinov2"]["birder"]
    dinov2 = _run_biodino(images, dataclasses.replace(CropsConfig(), **SMALL))
    areas = dinov2["areas"].by_size
    assert _same_distribution("local area", theirs["areas"].by_size[LOCAL], areas[LOCAL])
    outside = [float(x < 0.97 * 0.35) for x in areas[GLOBAL]]
    assert _same_rate("global area outside", [0.0] * len(outside), outside)
    for kind in ("global", "local"):
        assert _same_rate(f"{kind} gray", _chroma(theirs[f"{kind} out"]).amax((1, 2)) < 1.5 / 255,
                          _chroma(dinov2[f"{kind} out"]).amax((1, 2)) < 1.5 / 255)
    assert _same_rate("global with black fill", _black(theirs["global out"]) > 1e-3,
                      _black(dinov2["global out"]) > 1e-3)
    ours = same_crops["ours"]
    g, loc = ours["global"].float() / 255, ours["local"].float() / 255
    expected = {"jitter_p": "local unchanged", "hue": "local hue shift spread",
                "blur_p": "local blurred (sharpness < 0.6x)", "aug_level": "global colour ratio"}
    for key, value in dict(jitter_p=0.6, hue=0.1, blur_p=(0.0, 0.0, 0.4), aug_level=4).items():
        wrong = Photometric(_ours("dinov2", **{key: value}))
        if key == "aug_level":  # only the crops the value acts on
            out_g, _ = wrong(ours["global"], ours["local"][:0], torch.Generator().manual_seed(0))
            problems = _compare_changes("global", _changes(g, same_crops["chain out"]), _changes(g, _unit(out_g)))
        else:
            _, out_l = wrong(ours["global"][:2], ours["local"], torch.Generator().manual_seed(0))
            problems = _compare_changes("local", _changes(loc, same_crops["local out"]), _changes(loc, _unit(out_l)))
        assert any(p and p.startswith(expected[key] + ":") for p in problems), (key, problems)
