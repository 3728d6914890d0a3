"""crops.policy birder: each op of birder's global-crop chain against torchvision on uint8 images (what birder runs
it on), the chain's draws, the local path, the CPU side's random interpolation, cost and the config's checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from biodino.config.checks import check_crops_policy
from biodino.config.recipe import load_config
from biodino.config.schema import ConfigError, CropsConfig
from biodino.data.multicrop import MultiCrop
from biodino.data.birder_chain import BIRDER_OPS, BirderChain, BirderChainParams, birder_level
from biodino.data.photometric import Photometric
from biodino.data.synthetic import jpeg_bytes, photo

# The birder values of the seed recipes (train_dino_v2's defaults; train_franca's global_scale is (0.4, 1.0)).
BIRDER = dict(policy="birder", aug_level=5, global_scale=(0.35, 1.0), local_scale=(0.1, 0.35), jitter_p=0.8,
              brightness=0.25, contrast=0.15, saturation=0.0, hue=0.04, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.5),
              blur_sigma=(0.5, 1.2), blur_kernel_size=3, solarize_p=0.0)


def _cfg(**changes: object) -> CropsConfig:
    return dataclasses.replace(CropsConfig(), **{**BIRDER, **changes})


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """uint8 photographs (smooth, with noise and saturated regions) as (n, 3, size, size)."""
    out = [torch.from_numpy(np.array(photo(seed + i, size, size))).permute(2, 0, 1) for i in range(n)]
    return torch.stack(out)


def _params(chain: BirderChain, ops: list[str], **values: list[float]) -> BirderChainParams:
    """Stage 0 applies ``ops[i]`` to row i with the given parameter values; every later stage is the identity."""
    n, stages = len(ops), chain.level.max_ops
    ids = torch.zeros(n, stages, dtype=torch.long)
    ids[:, 0] = torch.tensor([chain.level.ops.index(op) for op in ops])
    full = {f: torch.zeros(n, stages) for f in BirderChainParams._fields
            if f not in ("count", "ops", "translate", "hue_first")}
    full["translate"] = torch.zeros(n, stages, 2)
    full["hue_first"] = torch.zeros(n, stages, dtype=torch.bool)
    for name, column in values.items():
        t = torch.tensor(column)
        full[name][:, 0] = t if name != "hue_first" else t.bool()
    return BirderChainParams(count=torch.ones(n, dtype=torch.long), ops=ids, **full)


def _run(chain: BirderChain, x: torch.Tensor, params: BirderChainParams) -> torch.Tensor:
    """The chain on uint8 images (as float levels)."""
    return chain(x.float(), params)


def _levels_apart(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    return (ours - theirs.float()).abs()


def test_level_5_is_the_scripts_default_chain() -> None:
    lv = birder_level(5)
    assert lv.ops == BIRDER_OPS and (lv.min_ops, lv.max_ops) == (2, 3)
    assert (lv.degrees, lv.brightness, lv.contrast, lv.hue, lv.saturation, lv.translate, lv.shear) == pytest.approx(
        (11.25, 0.2625, 0.175, 0.0375, 0.35, 0.1, 12.5))
    assert (lv.posterize_bits, lv.blur_kernel_size, lv.blur_sigma, lv.sharpness) == (6, 3, (0.5, 1.2), 1.2)
    assert (lv.solarize_threshold, lv.solarize_spread) == (195, 58)
    assert len(birder_level(1).ops) == 4 and len(birder_level(3).ops) == 11 and birder_level(10).max_ops == 5
    with pytest.raises(ValueError, match="aug_level"):
        birder_level(0)


@pytest.mark.parametrize("op,values,call", [
    ("rotate", dict(angle=[-11.0, -3.3, 4.1, 10.9]), lambda x, v: TF.affine(
        x, angle=v["angle"], translate=[0, 0], scale=1.0, shear=[0.0, 0.0], fill=0)),
    ("translate", dict(translate=[[-2.0, 1.0], [0.0, -2.0], [3.0, 0.0], [1.0, 2.0]]), lambda x, v: TF.affine(
        x, angle=0.0, translate=[int(t) for t in v["translate"]], scale=1.0, shear=[0.0, 0.0], fill=0)),
    ("shear", dict(shear=[-12.0, -5.5, 2.2, 12.4]), lambda x, v: TF.affine(
        x, angle=0.0, translate=[0, 0], scale=1.0, shear=[v["shear"], 0.0], fill=0)),
    ("posterize", {}, lambda x, v: TF.posterize(x, 6)),
    ("solarize", dict(threshold=[137.0, 160.0, 195.0, 253.0]), lambda x, v: TF.solarize(x, v["threshold"])),
])
def test_exact_ops_match_torchvision_on_uint8(op, values, call) -> None:
    """Pixel moves and bit ops: the same levels (nearest-sampling ties may land on the other pixel, rarely)."""
    chain, x = BirderChain(5), _images(4)
    out = _run(chain, x, _params(chain, [op] * 4, **values))
    for i in range(4):
        v = {k: col[i] for k, col in values.items()}
        mismatch = (_levels_apart(out[i], call(x[i], v)) > 1e-3).float().mean()
        assert mismatch <= 0.01, (op, i, float(mismatch))


@pytest.mark.parametrize("op,values,call", [
    ("brightness", dict(brightness=[0.74, 0.9, 1.1, 1.26]), lambda x, v: TF.adjust_brightness(x, v["brightness"])),
    ("saturation", dict(saturation=[0.65, 0.9, 1.2, 1.35]), lambda x, v: TF.adjust_saturation(x, v["saturation"])),
    ("contrast_hue", dict(contrast=[0.83, 0.9, 1.1, 1.17], hue=[-0.037, -0.01, 0.02, 0.037], hue_first=[0, 1, 0, 1]),
     lambda x, v: (TF.adjust_contrast(TF.adjust_hue(x, v["hue"]), v["contrast"]) if v["hue_first"]
                   else TF.adjust_hue(TF.adjust_contrast(x, v["contrast"]), v["hue"]))),
    ("blur", dict(sigma=[0.5, 0.7, 1.0, 1.2]), lambda x, v: TF.gaussian_blur(x, [3, 3], [v["sigma"]] * 2)),
    ("sharpness", dict(sharpness=[1.0, 1.1, 1.3, 1.4]), lambda x, v: TF.adjust_sharpness(x, v["sharpness"])),
    ("autocontrast", {}, lambda x, v: TF.autocontrast(x)),
    ("identity", {}, lambda x, v: x),
])
def test_colour_and_filter_ops_match_torchvision_on_uint8_within_a_level(op, values, call) -> None:
    """Float arithmetic, then truncated (the blur: rounded) to a level as torchvision's uint8 kernels do. Saturation
    and contrast blend with a gray that torchvision floors to a level first (a level apart more often; contrast and
    hue, two truncations: up to two); sharpness rounds its smoothed image to levels before blending."""
    chain, x = BirderChain(5), _images(4)
    most, often = {"saturation": (1, 0.3), "contrast_hue": (2, 0.3), "sharpness": (1, 0.1)}.get(op, (1, 0.02))
    x[:, :, 2:6, 2:6] = 255  # clipped highlights
    out = _run(chain, x, _params(chain, [op] * 4, **values))
    for i in range(4):
        v = {k: col[i] for k, col in values.items()}
        apart = _levels_apart(out[i], call(x[i], v))
        share = float((apart > 1e-3).float().mean())
        assert apart.max() <= most + 1e-3 and share <= often, (op, i, float(apart.max()), share)


def test_rows_keep_their_own_op_and_identity_rows_are_exact() -> None:
    chain, x = BirderChain(5), _images(len(BIRDER_OPS))
    params = chain.draw(len(BIRDER_OPS), 24, 24, torch.Generator().manual_seed(0), torch.device("cpu"))
    params = params._replace(ops=torch.zeros_like(params.ops))
    params.ops[:, 0] = torch.arange(len(BIRDER_OPS))
    out = _run(chain, x, params)
    torch.testing.assert_close(out[0], x[0].float(), atol=0, rtol=0)  # identity
    alone = _run(chain, x[5:6], BirderChainParams(*(t[5:6] for t in params)))
    torch.testing.assert_close(out[5], alone[0], atol=1e-4, rtol=0)  # translate, as if alone in the batch


def test_draws_follow_birders_counts_and_ranges() -> None:
    """Number of ops uniform in {2, 3}, each op uniform over the 12 (repeats allowed), magnitudes in range."""
    n = 20000
    p = BirderChain(5).draw(n, 64, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert abs(float((p.count == 3).float().mean()) - 0.5) < 0.02 and set(p.count.unique().tolist()) == {2, 3}
    assert bool((p.ops[:, 2] == 0)[p.count == 2].all())
    stage3 = (p.ops[:, 2] != 0).float().mean()  # a 3rd op happens half the time (then identity with 1/12)
    assert abs(float(stage3) - 0.5 * 11 / 12) < 0.02
    counts = torch.bincount(p.ops[:, :2].flatten(), minlength=12).float() / (2 * n)
    assert torch.allclose(counts, torch.full((12,), 1 / 12), atol=0.01)
    assert p.angle.abs().max() <= 11.25 and p.shear.abs().max() <= 12.5 and p.translate.abs().max() <= 6.4
    assert p.translate.eq(p.translate.round()).all()
    assert p.brightness.min() >= 0.7375 and p.brightness.max() <= 1.2625
    assert p.saturation.min() >= 0.65 and p.saturation.max() <= 1.35 + 1e-6 and p.sharpness.min() >= 1.0
    assert set(p.threshold.unique().tolist()) == set(range(137, 254))
    assert 0.45 < float(p.hue_first.float().mean()) < 0.55


def test_birder_policy_runs_the_chain_on_globals_and_jitter_blur_on_locals_as_torchvision_on_uint8() -> None:
    """Locals: birder's RandomApply(ColorJitter) then RandomApply(GaussianBlur), built crop by crop with torchvision
    on uint8 from the drawn parameters (the chain's draws come first): within 3 levels (4 truncations, a rounding,
    and torchvision's contrast floors its gray); globals: the chain with its own draws."""
    aug = Photometric(_cfg())
    g, loc = _images(4, 32), _images(40, 16, seed=50)
    out_g, out_l = aug(g, loc, torch.Generator().manual_seed(3))
    again = aug(g, loc, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_g, again[0], atol=0, rtol=0)
    torch.testing.assert_close(out_l, again[1], atol=0, rtol=0)
    gen = torch.Generator().manual_seed(3)
    chain_params = aug.chain.draw(4, 32, 32, gen, torch.device("cpu"))
    torch.testing.assert_close(out_g, aug._normalize(aug.chain(g.float(), chain_params) / 255), atol=0, rtol=0)
    p = aug._sample([(40, 0.5, 0.0)], gen, torch.device("cpu"))
    assert not p.gray.any() and not p.solarize.any() and p.jitter.any() and not p.jitter.all()
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    mean, std = torch.tensor(aug.cfg.normalize_mean).view(3, 1, 1), torch.tensor(aug.cfg.normalize_std).view(3, 1, 1)
    levels = (out_l * std + mean) * 255
    for i in range(40):
        y = loc[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                y = ops[op](y, float(p.factors[i, op]))
        if p.blur[i]:
            y = TF.gaussian_blur(y, [3, 3], [float(p.sigma[i])] * 2)
        bias = float((levels[i] - y.float()).mean())
        assert _levels_apart(levels[i], y).max() <= 3 + 1e-3 and abs(bias) <= 0.5, (i, bias)


def test_birder_policy_without_local_crops() -> None:
    out_g, out_l = Photometric(_cfg(num_local=0))(_images(2, 16), torch.zeros(0, 3, 8, 8, dtype=torch.uint8),
                                                  torch.Generator().manual_seed(0))
    assert out_g.shape == (2, 3, 16, 16) and out_l.shape == (0, 3, 8, 8)


def test_birder_policy_call_has_no_syncs_or_host_copies() -> None:
    from tests.unit.data.test_photometric_cost import Census

    aug = Photometric(_cfg())
    g, loc = _images(4, 32), _images(16, 16)
    aug(g, loc, torch.Generator().manual_seed(0))
    with Census() as census:
        aug(g, loc, torch.Generator().manual_seed(1))
    assert census.syncs == 0 and census.host_copies == 0, census.ops


def test_birder_multicrop_resizes_each_global_crop_bilinearly_or_bicubically_and_keeps_the_boxes() -> None:
    """The boxes and flips draw as in the dinov2 policy; a global crop then differs from its dinov2 twin exactly when
    it was resized bilinearly (about half of them); local crops never differ."""
    cfg = dataclasses.replace(_cfg(), global_size=32, local_size=16, num_local=2)
    plain = dataclasses.replace(cfg, policy="dinov2", aug_level=None)
    changed, n = 0, 60
    for i in range(n):
        data = jpeg_bytes(photo(i, 80, 64))
        ours = MultiCrop(cfg)(data, np.random.default_rng(i))
        theirs = MultiCrop(plain)(data, np.random.default_rng(i))
        changed += sum(not torch.equal(a, b) for a, b in zip(ours["global_crops"], theirs["global_crops"]))
        assert all(torch.equal(a, b) for a, b in zip(ours["local_crops"], theirs["local_crops"]))
    assert 0.3 < changed / (2 * n) < 0.7


def test_config_checks_refuse_what_birder_has_not() -> None:
    check_crops_policy(_cfg())
    cases = [(dict(aug_level=None), "needs crops.aug_level"), (dict(grayscale_p=0.2), r"crops.grayscale_p \(0.2\)"),
             (dict(solarize_p=0.2), "crops.solarize_p"), (dict(blur_p=(1.0, 0.1, 0.5)), r"crops.blur_p\[0\] \(1.0\)"),
             (dict(blur_reference_inverted=True), "blur_reference_inverted"),
             (dict(policy="dinov2"), "crops.aug_level")]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_crops_policy(_cfg(**changes))
    with pytest.raises(ConfigError, match="crops.policy"):
        load_config("tiny", ["crops.policy=timm"])
    with pytest.raises(ConfigError, match="crops.aug_level"):
        load_config("tiny", ["crops.policy=birder", "crops.aug_level=11"])
    overrides = [f"crops.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in BIRDER.items()]
    assert load_config("tiny", overrides).crops.aug_level == 5
    with pytest.raises(ValueError, match="aug_level"):
        Photometric(_cfg(aug_level=None))
