"""A student or teacher: backbone, heads and the iBOT mask token, under birder's key names."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from biodino.models import VisionTransformer


class SSLNetwork(nn.Module):
    """``backbone``, ``dino_head``, optional separate ``ibot_head`` (else the DINO head is shared), ``mask_token``."""

    def __init__(self, backbone: VisionTransformer, dino_head: nn.Module, ibot_head: Optional[nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))

    @property
    def patch_head(self) -> nn.Module:
        return self.ibot_head if self.ibot_head is not None else self.dino_head
