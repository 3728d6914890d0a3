"""A student or teacher: backbone, heads and the iBOT mask token, under birder's key names."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from biodino.models import BackboneOutput, VisionTransformer


class SSLNetwork(nn.Module):
    """``backbone``, ``dino_head``, optional separate ``ibot_head`` (else the DINO head is shared), ``mask_token``."""

    def __init__(self, backbone: VisionTransformer, dino_head: nn.Module, ibot_head: Optional[nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))

    def forward(self, xs: list[torch.Tensor], masks: Optional[list[Optional[torch.Tensor]]] = None
                ) -> list[BackboneOutput]:
        """Backbone features of each batch in ``xs`` (global and local crops: one pass of the blocks for all),
        masked patches replaced by the mask token. Calling the network (not its backbone) is what lets FSDP gather
        the root's parameters, the mask token among them."""
        return self.backbone.forward_features_list(xs, masks or [None] * len(xs), self.mask_token)

    def heads(self, cls: torch.Tensor, patches: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits of the class tokens (DINO head) and of the masked patch tokens (iBOT head), as lists of levels
        (one for DINOv2, the nesting levels for Franca). A shared head runs once on both, so FSDP gathers it once."""
        if patches is None:
            return _levels(self.dino_head(cls)), []
        if self.ibot_head is not None:
            return _levels(self.dino_head(cls)), _levels(self.ibot_head(patches))
        both = _levels(self.dino_head(torch.cat([cls, patches])))
        return [lv[: cls.shape[0]] for lv in both], [lv[cls.shape[0]:] for lv in both]

    def no_weight_decay(self) -> set[str]:
        """The network's own token (layer 0 of the layer-wise decay, like the backbone's tokens)."""
        return {"mask_token"}

    def sharding_units(self) -> list[nn.Module]:
        """What FSDP wraps separately, inner first: every block, then each head (the network itself is the root)."""
        return [*self.backbone.blocks, self.dino_head, *([self.ibot_head] if self.ibot_head is not None else [])]

    @property
    def patch_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.dino_head


def _levels(logits: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A head's output as a list of levels: DINOv2's one tensor, or Franca's nested levels."""
    return logits if isinstance(logits, list) else [logits]


def freeze_unused(network: SSLNetwork, ibot: bool) -> SSLNetwork:
    """Without iBOT the mask token and a separate iBOT head get no gradient: freeze them, so DDP does not wait
    for their gradients and the optimizer skips them (they stay in checkpoints, as in birder's layout)."""
    if not ibot:
        network.mask_token.requires_grad_(False)
        if network.ibot_head is not None:
            network.ibot_head.requires_grad_(False)
    return network
