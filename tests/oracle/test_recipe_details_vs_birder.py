"""The rest of the seed recipes against what birder 0.8.4's ``train_dino_v2`` and ``train_franca`` build for the
published commands: stochastic depth per block, from-scratch initialization, iBOT mask shapes. dinov2's recipe is
checked to keep dinov2's (uniform drop path, its init, its mask aspect range)."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from biodino.config.recipe import load_config
from biodino.data.datamodule import mask_sampler
from biodino.data.masking import BlockMasking, CyclicMasking
from biodino.ssl.dinov2 import student_backbone

birder_registry = pytest.importorskip("birder.model_registry").registry  # dev extra: always present in CI

SEEDS = {"bio_dino/stage1_224": "vit_reg4_so150m_p14_ls", "franca_bioscan5m": "vit_b16_ls"}


def _birder_student(network: str, size: int) -> torch.nn.Module:
    """The student backbone as the scripts build it: ``net_factory(network, 0, size)``, no --model-config."""
    torch.manual_seed(0)
    return birder_registry.net_factory(network, 0, size=(size, size))


def _ours(recipe: str, *overrides: str) -> torch.nn.Module:
    torch.manual_seed(1)
    return student_backbone(load_config(recipe, list(overrides)))


@pytest.fixture(scope="module", params=sorted(SEEDS))
def seed_pair(request) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    recipe = request.param
    ours = _ours(recipe)
    return recipe, ours, _birder_student(SEEDS[recipe], ours.image_size)


def test_drop_path_per_block_equals_birders(seed_pair) -> None:
    _, ours, theirs = seed_pair
    mine = [blk.drop_path.p for blk in ours.encoder.block]
    ref = [blk.drop_path.p for blk in theirs.encoder.block]
    assert len(mine) == len(ref) and mine[0] == 0.0
    assert mine == pytest.approx(ref, abs=1e-7)


def test_from_scratch_init_draws_as_birders(seed_pair) -> None:
    """Per tensor: zero where birder's is zero, else the same spread (std within max(3%, 5 / sqrt(n)), about seven
    standard errors of the difference of two sample stds), mean (six standard errors) and range."""
    _, ours, theirs = seed_pair
    ref = {k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier")}
    mine = ours.state_dict()
    assert mine.keys() == ref.keys()
    for name, r in ref.items():
        m = mine[name].float()
        if r.abs().max() == 0 or r.std() == 0:
            assert torch.equal(m, r.float()), name
            continue
        assert m.std().item() == pytest.approx(r.std().item(), rel=max(0.03, 5 / math.sqrt(r.numel()))), name
        assert abs(m.mean() - r.mean()).item() < 6 * r.std().item() / math.sqrt(r.numel()) + 1e-7, name
        assert m.abs().max().item() <= 1.2 * r.abs().max().item() + 1e-7, name  # uniform vs normal shows here


def test_dinov2_recipe_keeps_dinov2s_depth_rates_and_init() -> None:
    ours = _ours("bio_dino_dinov2")
    assert [blk.drop_path.p for blk in ours.encoder.block] == [0.3] * 18
    assert 0 < ours.class_token.std().item() < 1e-5  # dinov2: tokens of std 1e-6, not zero
    fc1 = ours.encoder.block[0].mlp[0].weight
    assert fc1.std().item() == pytest.approx(0.02, rel=0.03)  # truncated normal, not PyTorch's uniform


def _extent(mask: torch.Tensor, grid: tuple[int, int]) -> tuple[int, int]:
    m = mask.reshape(grid).bool()
    return int(m.any(1).sum()), int(m.any(0).sum())


def test_bio_dino_masks_match_birders_block_masking_in_distribution() -> None:
    """birder's DINOv2BlockMasking(min 4 patches, at most half the grid, aspect 0.33-3.33) against the recipe's
    generator: masked counts and the masks' row and column extents, over 1,500 draws per ratio."""
    script = pytest.importorskip("birder.scripts.train_dino_v2")
    cfg = load_config("bio_dino/stage1_224")
    ours = mask_sampler(cfg, BlockMasking).generator
    grid = (ours.height, ours.width)
    n_all = grid[0] * grid[1]
    theirs = script.DINOv2BlockMasking(grid, min_num_patches=4, max_num_patches=n_all // 2, min_aspect=0.33,
                                       max_aspect=3.33)
    state, rng = random.getstate(), random.Random(0)
    try:
        random.seed(0)
        for ratio in (0.1, 0.3, 0.5):
            n = int(n_all * ratio)
            a, b = [theirs(n) for _ in range(1500)], [ours(n, rng) for _ in range(1500)]
            assert statistics.mean(int(x.sum()) for x in b) == pytest.approx(
                statistics.mean(int(x.sum()) for x in a), rel=0.01)
            for axis in (0, 1):
                assert statistics.mean(_extent(x, grid)[axis] for x in b) == pytest.approx(
                    statistics.mean(_extent(x, grid)[axis] for x in a), rel=0.03), (ratio, axis)
    finally:
        random.setstate(state)


def test_franca_masks_equal_birders_under_the_same_seed() -> None:
    script = pytest.importorskip("birder.scripts.train_franca")
    ours = mask_sampler(load_config("franca_bioscan5m"), CyclicMasking).generator
    grid = (ours.height, ours.width)
    theirs = script.FrancaInverseRollBlockMasking(grid, num_masking_patches=0, min_aspect=0.33, max_aspect=3.33)
    state = random.getstate()
    try:
        for seed in range(10):
            rng = random.Random(seed)
            random.seed(seed)
            for n in range(1, grid[0] * grid[1], 11):
                assert torch.equal(ours(n, rng), theirs._generate(n).flatten()), (seed, n)
    finally:
        random.setstate(state)
