"""The seed recipes' optimizer groups against birder 0.8.4's own ``training_utils.optimizer_parameter_groups``
called as its training scripts call it with their defaults (a published command sets none of the group
options): every student parameter's weight decay and lr scale, name by name. dinov2's policy is checked against
what it must exempt."""

from __future__ import annotations

import pytest
import torch

from biodino.config.recipe import load_config
from biodino.run.trainer import build_module
from biodino.ssl.param_groups import param_groups

SEED_RECIPES = ["bio_dino/stage1_224", "bio_dino/stage2_252", "franca_bioscan5m"]


def _student(recipe: str, *overrides: str):
    cfg = load_config(recipe, list(overrides))
    with torch.device("meta"):  # the full-size heads, without memory or initialization
        return cfg, build_module(cfg).student


def _ours(student, cfg) -> dict[str, tuple[float, float]]:
    """name -> (weight decay at the schedule's start, lr scale)."""
    by_id = {id(p): n for n, p in student.named_parameters()}
    return {by_id[id(p)]: (g["wd_mult"] * cfg.optim.weight_decay, g["lr_mult"])
            for g in param_groups(student, cfg.optim) for p in g["params"]}


@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_seed_recipes_group_parameters_as_birders_scripts_do(recipe) -> None:
    from birder.common.training_utils import optimizer_parameter_groups

    cfg, student = _student(recipe)
    assert cfg.optim.param_groups == "birder"
    base_lr = 1e-3
    theirs = {}
    by_id = {id(p): n for n, p in student.named_parameters()}
    for group in optimizer_parameter_groups(student, cfg.optim.weight_decay, base_lr=base_lr,
                                            backbone_prefix="backbone"):
        for p in (group["params"] if isinstance(group["params"], list) else [group["params"]]):
            theirs[by_id[id(p)]] = (group["weight_decay"], group.get("lr", base_lr) / base_lr)
    ours = _ours(student, cfg)
    assert ours.keys() == theirs.keys() and len(ours) > 200
    assert {n: v for n, v in ours.items() if v != theirs[n]} == {}


def test_the_dinov2_policy_exempts_what_dinov2_exempts() -> None:
    """Biases, norms, LayerScale, tokens and the position embedding without weight decay; the patch embedding
    at 0.2x the lr (the recipe's patch_embed_lr_mult); everything else decayed at full lr."""
    cfg, student = _student("bio_dino/stage1_224", "optim.param_groups=dinov2", "optim.patch_embed_lr_mult=0.2")
    ours = _ours(student, cfg)
    exempt = {n for n, p in student.named_parameters()
              if p.ndim <= 1 or n.split(".")[-1] in ("class_token", "reg_tokens", "pos_embedding", "mask_token")
              or "layer_scale" in n}
    assert {n for n, (wd, _) in ours.items() if wd == 0} == exempt
    assert {n for n, (_, lr) in ours.items() if lr != 1.0} == {"backbone.conv_proj.weight", "backbone.conv_proj.bias"}
    assert ours["backbone.conv_proj.weight"][1] == 0.2


def test_the_franca_recipe_builds_birders_published_student() -> None:
    """`train_franca --network vit_b16_ls --dino-out-dim 65536 --head-bottleneck-dim 320 --ibot-separate-head
    --ibot-out-dim 65536 --nesting-levels 4` (hidden 2048 and 3 layers by default): the same parameter count for
    the backbone, the DINO head, the separate iBOT head and the mask token."""
    from birder.model_registry import registry
    from birder.net.ssl.franca import FrancaStudent

    cfg, ours = _student("franca_bioscan5m")
    with torch.device("meta"):
        backbone = registry.net_factory("vit_b16_ls", 0, 3, size=(224, 224))
        theirs = FrancaStudent(backbone, config={
            "dino_out_dim": 65536, "use_bn": False, "num_layers": 3, "hidden_dim": 2048, "head_bottleneck_dim": 320,
            "ibot_separate_head": True, "ibot_out_dim": 65536, "nesting_levels": 4})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.dino_head) == count(theirs.dino_head) == 62_594_720  # REFERENCE.md's count
    assert count(ours.ibot_head) == count(theirs.ibot_head)
    assert count(ours.backbone) == count(theirs.backbone) == 85_817_088
    assert count(ours) == count(theirs)
