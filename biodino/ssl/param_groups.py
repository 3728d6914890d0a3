"""Optimizer parameter groups: weight-decay exclusions, layer-wise lr decay, patch-embed lr, last layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

# Parameters placed at layer 0 of the layer-wise decay and excluded from weight decay.
EMBEDDING_PARAMS = ("conv_proj.", "class_token", "reg_tokens", "pos_embedding", "mask_token")
NO_DECAY_PARAMS = ("class_token", "reg_tokens", "pos_embedding", "mask_token")


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is optimized: multipliers applied to the scheduled lr and weight decay."""

    lr_mult: float
    wd_mult: float
    last_layer: bool


def param_rule(name: str, ndim: int, depth: int, layer_decay: float, patch_embed_lr_mult: float) -> ParamRule:
    """The rule for a student parameter named as in ``SSLNetwork`` (``backbone.*``, ``*_head.*``, ``mask_token``)."""
    local = name.removeprefix("backbone.")
    in_backbone = local != name or name == "mask_token"
    if not in_backbone:
        layer_id = depth + 1  # heads: full lr
    elif local.startswith(EMBEDDING_PARAMS):
        layer_id = 0
    elif local.startswith("encoder.block."):
        layer_id = int(local.split(".")[2]) + 1
    else:
        layer_id = depth + 1  # final norm
    lr_mult = layer_decay ** (depth + 1 - layer_id)
    if local.startswith("conv_proj."):
        lr_mult *= patch_embed_lr_mult
    no_decay = ndim <= 1 or local.startswith(NO_DECAY_PARAMS)
    return ParamRule(lr_mult=lr_mult, wd_mult=0.0 if no_decay else 1.0, last_layer=".last_layer." in f".{name}")


def param_groups(student: nn.Module, depth: int, layer_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """Trainable student parameters grouped by identical rules; each group carries its rule's fields."""
    groups: dict[ParamRule, list[nn.Parameter]] = {}
    for name, p in _trainable(student):
        rule = param_rule(name, p.ndim, depth, layer_decay, patch_embed_lr_mult)
        groups.setdefault(rule, []).append(p)
    return [{"params": ps, "lr_mult": r.lr_mult, "wd_mult": r.wd_mult, "last_layer": r.last_layer}
            for r, ps in groups.items()]


def _trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)
