"""Self-distillation losses and the teacher-side centering they use."""

from biodino.ssl.losses.centering import SinkhornQueue, SoftmaxCenter, sinkhorn_knopp
from biodino.ssl.losses.dino import dino_loss
from biodino.ssl.losses.ibot import ibot_loss
from biodino.ssl.losses.koleo import koleo_loss

__all__ = ["SinkhornQueue", "SoftmaxCenter", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp"]
