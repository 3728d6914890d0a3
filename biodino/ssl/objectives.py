"""The objectives by name (``objective.name``): each a LightningModule class that checks its part of the config
(``check``), builds its network, heads and targets, and names the iBOT masks it learns from (``mask_shape``)."""

from __future__ import annotations

from biodino.ssl.dinov2 import DINOv2Module
from biodino.ssl.franca import FrancaModule
from biodino.ssl.module import SSLModule

OBJECTIVES: dict[str, type[SSLModule]] = {"dinov2": DINOv2Module, "franca": FrancaModule}
