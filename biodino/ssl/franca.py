"""The Franca objective: DINOv2's losses per level of nested Matryoshka heads, Sinkhorn-Knopp targets per
level (optionally with a queue of recent teacher rows), and inverse-roll (cyclic) iBOT masks."""

from __future__ import annotations

from typing import Optional

import torch

from biodino.data.masking import CyclicMasking
from biodino.models import preset_config
from biodino.ssl.dinov2 import DINOv2Module, check_objective, student_backbone
from biodino.ssl.losses import SinkhornQueue, sinkhorn_knopp
from biodino.ssl.matryoshka import MatryoshkaHead
from biodino.ssl.network import SSLNetwork, freeze_unused
from biodino.config.schema import ConfigError, HeadConfig, TrainConfig


def check_franca(cfg: TrainConfig) -> None:
    """DINOv2's checks, Sinkhorn-Knopp targets, and nesting levels that give every level a width and prototypes."""
    check_objective(cfg)
    o = cfg.objective
    if o.centering != "sinkhorn_knopp":
        raise ConfigError(f"objective.centering must be 'sinkhorn_knopp' for Franca, got {o.centering!r}")
    dim, coarsest = preset_config(cfg.model.preset).dim, 2 ** (o.franca.nesting_levels - 1)
    if dim % coarsest:
        raise ConfigError(f"objective.franca.nesting_levels: {o.franca.nesting_levels} levels need an embedding size "
                          f"divisible by {coarsest}; {cfg.model.preset} has {dim}")
    for key, head in (("dino", o.dino.head), ("ibot", o.ibot.head)):
        if (key == "dino" or o.ibot.separate_head) and head.num_prototypes < coarsest:
            raise ConfigError(f"objective.{key}.head.num_prototypes: {head.num_prototypes} leaves the coarsest of "
                              f"{o.franca.nesting_levels} levels without prototypes (needs >= {coarsest})")


def _head(in_dim: int, h: HeadConfig, levels: int, matryoshka_input: str) -> MatryoshkaHead:
    return MatryoshkaHead(in_dim, h.num_prototypes, levels, h.hidden_dim, h.bottleneck_dim, h.nlayers,
                          matryoshka_input=matryoshka_input)


class FrancaModule(DINOv2Module):
    """Franca (valeoai/Franca): same batch, crops, EMA, schedules and KoLeo (on the full class token) as DINOv2."""

    mask_shape = CyclicMasking  # inverse-roll masks
    check = staticmethod(check_franca)

    softmax_centers = False  # Sinkhorn-Knopp only

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        o = cfg.objective
        self.dino_queue = self.ibot_queue = None
        if o.franca.sinkhorn_queue_size > 0:
            size, dtype = o.franca.sinkhorn_queue_size, getattr(torch, o.franca.sinkhorn_queue_dtype)
            self.dino_queue = SinkhornQueue(size, self.student.dino_head.num_prototypes, dtype)
            self.ibot_queue = SinkhornQueue(size, self.student.patch_head.num_prototypes, dtype)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints of earlier versions carry DINOv2's softmax centers, which Franca never used."""
        for key in ("dino_center.center", "ibot_center.center"):
            checkpoint["state_dict"].pop(key, None)

    def build_network(self) -> SSLNetwork:
        o = self.cfg.objective
        backbone = student_backbone(self.cfg)
        dim, levels, reads = backbone.embed_dim, o.franca.nesting_levels, o.franca.matryoshka_input
        ibot_head = _head(dim, o.ibot.head, levels, reads) if o.ibot.separate_head else None
        return freeze_unused(SSLNetwork(backbone, _head(dim, o.dino.head, levels, reads), ibot_head),
                             o.ibot.weight > 0)

    def targets(self, logits: list[torch.Tensor], kind: str, temp: float,
                valid: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Sinkhorn-Knopp per level; queued rows of earlier steps join the prototype sums once the queue is full
        (a device flag: the queue takes part with weight 0 until then, so the host never waits to read it)."""
        queue = self.dino_queue if kind == "dino" else self.ibot_queue
        iters = self.cfg.objective.sinkhorn_iterations
        if queue is None:
            return [sinkhorn_knopp(level, temp, iters, valid=valid) for level in logits]
        out = [sinkhorn_knopp(level, temp, iters, queue=queued, valid=valid, queue_valid=queue.full)
               for level, queued in zip(logits, queue.levels())]
        queue.push(logits, valid)
        return out
