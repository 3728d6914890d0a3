"""Masking statistics, schedules, EMA and parameter groups of the DINOv2 recipe."""

from __future__ import annotations

import math
import random

import pytest
import torch

from biodino.ssl.ema import ema_update_
from biodino.data.masking import BlockMasking, MaskSampler
from biodino.ssl.param_groups import param_rule
from biodino.ssl.schedules import Schedules, sqrt_scaled_lr
from biodino.config.schema import TrainConfig


def _exact(n: int, rng: random.Random, num_patches: int = 100) -> torch.Tensor:
    """A generator that masks exactly n random patches, to isolate the ratio sampling."""
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[rng.sample(range(num_patches), n)] = True
    return mask


def test_mask_ratios_are_one_per_stratified_bin() -> None:
    sampler = MaskSampler(_exact, 100, probability=0.5, ratio_min=0.1, ratio_max=0.5)
    masks = sampler(16, random.Random(0))
    counts = sorted(int(c) for c in masks.sum(1))
    assert counts[:8] == [0] * 8  # half the crops unmasked
    edges = [0.1 + 0.4 * i / 8 for i in range(9)]
    for i, c in enumerate(counts[8:]):  # each masked crop falls in its own bin
        assert int(100 * edges[i]) <= c <= int(100 * edges[i + 1]), (i, c)


def test_masked_crops_are_shuffled_over_the_batch() -> None:
    sampler = MaskSampler(_exact, 100, probability=0.5)
    rows = torch.stack([sampler(8, random.Random(s)).any(1) for s in range(50)])
    assert 0.3 < rows.float().mean(0).min() and rows.float().mean(0).max() < 0.7


def test_block_masking_reaches_its_target_with_rectangles() -> None:
    gen, rng = BlockMasking((16, 16)), random.Random(0)
    ratios = []
    for _ in range(200):
        target = rng.randint(26, 128)
        mask = gen(target, rng)
        assert mask.shape == (256,)
        assert int(mask.sum()) <= target
        ratios.append(int(mask.sum()) / target)
    assert sum(ratios) / len(ratios) > 0.9
    for seed in range(20):  # each block is one filled rectangle of 4 or more patches, with a bounded aspect
        one = torch.zeros(16, 16, dtype=torch.bool)
        added = gen._add_block(one, 40, random.Random(seed))
        rows, cols = one.any(1).nonzero().flatten(), one.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert added == int(one.sum()) == h * w and 3 <= h * w <= 40
        assert 0.3 / 2 <= h / w <= 2 / 0.3  # log-uniform aspect in [0.3, 3.33], up to rounding


def _cfg() -> TrainConfig:
    cfg = TrainConfig()
    cfg.schedule.epochs, cfg.schedule.steps_per_epoch, cfg.schedule.batch_size = 10, 100, 64
    cfg.schedule.accumulate_grad_batches, cfg.trainer.devices = 2, 2  # global batch 256
    cfg.optim.warmup_epochs, cfg.objective.warmup_teacher_temp_epochs = 2, 3
    cfg.objective.freeze_last_layer_epochs = 1
    return cfg


def test_schedules_hit_their_endpoints() -> None:
    s = Schedules(_cfg())
    peak = 4e-3 * math.sqrt(256 / 1024)
    assert sqrt_scaled_lr(4e-3, 256) == pytest.approx(2e-3)
    assert s.lr(0) == 0.0 and s.lr(100) == pytest.approx(peak / 2) and s.lr(200) == pytest.approx(peak)
    assert s.lr(999) == pytest.approx(1e-6) and s.lr(600) < s.lr(300)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(999) == pytest.approx(0.2)
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(999) == pytest.approx(1.0)
    mid = 0.992 + (1 - 0.992) * 0.5 * (1 - math.cos(math.pi * 500 / 999))
    assert s.momentum(500) == pytest.approx(mid)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(150) == pytest.approx(0.055)
    assert s.teacher_temp(300) == pytest.approx(0.07) and s.teacher_temp(900) == pytest.approx(0.07)
    assert s.last_layer_frozen(99) and not s.last_layer_frozen(100)


def test_ema_moves_teacher_by_one_minus_momentum_of_the_difference() -> None:
    t, s = [torch.randn(4, 3), torch.randn(5)], [torch.randn(4, 3), torch.randn(5)]
    before = [x.clone() for x in t]
    ema_update_(t, s, 0.99)
    for new, old, st in zip(t, before, s):
        torch.testing.assert_close(new - old, 0.01 * (st - old))


def _tiny_network():
    from biodino.models import build_backbone
    from biodino.ssl.heads import DINOHead
    from biodino.ssl.network import SSLNetwork

    with torch.device("meta"):
        return SSLNetwork(build_backbone("vit_tiny_p8"), DINOHead(96, 16, 32, 8), None)


@pytest.mark.parametrize(
    "name,ndim,lr_mult,wd_mult,last",
    [
        ("backbone.conv_proj.weight", 4, 0.9**5 * 0.2, 1.0, False),
        ("backbone.pos_embedding", 3, 0.9**5, 0.0, False),
        ("backbone.class_token", 3, 0.9**5, 0.0, False),
        ("backbone.reg_tokens", 3, 0.9**5, 0.0, False),
        ("mask_token", 1, 0.9**5, 0.0, False),
        ("backbone.encoder.block.0.attn.qkv.weight", 2, 0.9**4, 1.0, False),
        ("backbone.encoder.block.0.attn.qkv.bias", 1, 0.9**4, 0.0, False),
        ("backbone.encoder.block.3.layer_scale_1.gamma", 1, 0.9**1, 0.0, False),
        ("backbone.encoder.block.3.norm2.weight", 1, 0.9**1, 0.0, False),
        ("backbone.norm.weight", 1, 1.0, 0.0, False),
        ("dino_head.mlp.0.weight", 2, 1.0, 1.0, False),
        ("dino_head.last_layer.parametrizations.weight.original1", 2, 1.0, 1.0, True),
        ("ibot_head.last_layer.parametrizations.weight.original0", 2, 1.0, 1.0, True),
    ],
)
def test_param_rules(name: str, ndim: int, lr_mult: float, wd_mult: float, last: bool) -> None:
    rule = param_rule(name, ndim, _tiny_network(), layer_decay=0.9, patch_embed_lr_mult=0.2)  # depth 4
    assert rule.lr_mult == pytest.approx(lr_mult) and rule.wd_mult == wd_mult and rule.last_layer == last
