"""Optimizer parameter groups: weight-decay exclusions, layer-wise lr decay, patch-embed lr, last layers, from the
structure the backbone and the network publish (``no_weight_decay``, ``layer_id``, ``is_patch_embed``).

Two policies (``optim.param_groups``): ``dinov2``, facebookresearch/dinov2's (no weight decay on biases, norms,
LayerScale, tokens and position embedding; layer-wise decay and a patch-embedding lr multiplier), and ``birder``,
what birder's training scripts do when a command sets none of their group options, as the seed models' did:
weight decay and the scheduled lr on every parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from biodino.config.schema import OptimConfig


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is optimized: multipliers applied to the scheduled lr and weight decay."""

    lr_mult: float
    wd_mult: float
    last_layer: bool


def param_rule(name: str, ndim: int, network: Any, layer_decay: float, patch_embed_lr_mult: float,
               policy: str = "dinov2") -> ParamRule:
    """The rule for a student parameter named as in ``SSLNetwork`` (``backbone.*``, ``*_head.*``, ``mask_token``)."""
    last_layer = ".last_layer." in f".{name}"
    if policy == "birder":
        return ParamRule(lr_mult=1.0, wd_mult=1.0, last_layer=last_layer)
    backbone, depth = network.backbone, network.backbone.cfg.depth
    local = name.removeprefix("backbone.")
    if local != name:
        layer_id, no_decay, patch = backbone.layer_id(local), local in backbone.no_weight_decay(), backbone.is_patch_embed(local)
    else:
        no_decay = name in network.no_weight_decay()
        layer_id, patch = (0 if no_decay else depth + 1), False  # its tokens: layer 0; heads: full lr
    lr_mult = layer_decay ** (depth + 1 - layer_id) * (patch_embed_lr_mult if patch else 1.0)
    no_decay = no_decay or ndim <= 1
    return ParamRule(lr_mult=lr_mult, wd_mult=0.0 if no_decay else 1.0, last_layer=last_layer)


def param_groups(student: nn.Module, optim: OptimConfig) -> list[dict]:
    """Trainable student parameters grouped by identical rules; each group carries its rule's fields."""
    groups: dict[ParamRule, list[nn.Parameter]] = {}
    for name, p in _trainable(student):
        rule = param_rule(name, p.ndim, student, optim.layerwise_decay, optim.patch_embed_lr_mult, optim.param_groups)
        groups.setdefault(rule, []).append(p)
    return [{"params": ps, "lr_mult": r.lr_mult, "wd_mult": r.wd_mult, "last_layer": r.last_layer}
            for r, ps in groups.items()]


def _trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)
